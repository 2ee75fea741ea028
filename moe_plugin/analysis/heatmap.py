"""Mean routing weight of each (class, expert) pair, per MoE layer.

V-MoE's figure (arXiv 2106.05974, figure 7): over a data split, how much of
each class's tokens each expert received. The routing weight of token ``n``
and expert ``e`` is the weight with which ``e``'s output enters ``n``
(:attr:`LayerRouting.weights`: the combine weight of a kept choice, 0 where
``e`` did not process ``n``; for Soft MoE and SpheroMoE the token's combine
weight on ``e``'s slots); all tokens of an image count, class token
included.
"""
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .recording import LayerRouting, RoutingRecorder
from .sweep import model_logits


class ClassExpertAccumulator:
    """Sums of per-token routing statistics by class, for one layer.

    Args:
        num_classes (int): ``C``.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.sums: Dict[str, Tensor] = {}
        self.tokens = torch.zeros(num_classes, dtype=torch.float64)
        self.images = torch.zeros(num_classes, dtype=torch.long)

    def update(self, routing: LayerRouting, labels: Tensor) -> None:
        """Add one batch: ``routing`` of ``B`` images with ``labels [B]``."""
        labels = labels.reshape(-1).cpu().long()
        if labels.numel() and (labels.min() < 0
                               or labels.max() >= self.num_classes):
            raise ValueError(f'labels must be in [0, {self.num_classes}), '
                             f'got {labels.tolist()}')
        fields = dict(weights=routing.weights, probs=routing.probs)
        if routing.taken is not None:
            fields['taken'] = routing.taken
        if routing.dropped is not None:
            fields['dropped'] = routing.dropped
        tokens = routing.weights.shape[1]
        for key, value in fields.items():
            per_image = value.detach().to('cpu', torch.float64).sum(1)
            total = self.sums.setdefault(
                key,
                torch.zeros(self.num_classes, per_image.shape[-1],
                            dtype=torch.float64))
            total.index_add_(0, labels, per_image)
        self.tokens.index_add_(
            0, labels, torch.full(labels.shape, float(tokens),
                                  dtype=torch.float64))
        self.images += torch.bincount(labels, minlength=self.num_classes)

    def result(self) -> Dict[str, np.ndarray]:
        """Per-token means ``[C, E]`` (0 for a class without images):
        ``weights``, ``probs`` (the clean routing distribution), and for
        sparse layers ``taken``/``dropped`` (share of tokens the expert
        processed / that chose it and were dropped); ``images [C]``."""
        denominator = self.tokens.clamp_min(1.0).unsqueeze(1)
        out = {key: (value / denominator).numpy()
               for key, value in self.sums.items()}
        out['images'] = self.images.numpy()
        return out


def class_expert_means(model: nn.Module,
                       batches: Iterable[Tuple[Tensor, Tensor]],
                       num_classes: int,
                       layers: Optional[Dict[str, nn.Module]] = None
                       ) -> Dict[str, Dict[str, np.ndarray]]:
    """Run the model over ``batches`` and average routing by class.

    Args:
        model (nn.Module): in evaluation mode.
        batches (Iterable): ``(inputs, labels)`` pairs.
        num_classes (int): ``C``.
        layers (dict, optional): name -> layer to record (see
            :func:`~moe_plugin.analysis.select_moe_layers`); every MoE
            layer by default.

    Returns:
        dict: layer name -> :meth:`ClassExpertAccumulator.result`, plus
        ``kind`` (a string).
    """
    accumulators: Dict[str, ClassExpertAccumulator] = {}
    kinds: Dict[str, str] = {}
    with torch.no_grad(), RoutingRecorder(model, layers) as recorder:
        for inputs, labels in batches:
            model_logits(model, inputs)
            for name, routing in recorder.last.items():
                accumulators.setdefault(
                    name, ClassExpertAccumulator(num_classes)).update(
                        routing, labels)
                kinds[name] = routing.kind
    if not accumulators:
        raise ValueError('no batch to average: the data split is empty')
    return {
        name: dict(acc.result(), kind=kinds[name])
        for name, acc in accumulators.items()
    }
