from .moe_classifier import DEFAULT_AUX_LOSS_WEIGHTS, MoEImageClassifier

__all__ = ['DEFAULT_AUX_LOSS_WEIGHTS', 'MoEImageClassifier']
