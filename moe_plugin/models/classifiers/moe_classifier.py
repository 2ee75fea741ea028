"""An image classifier that adds the auxiliary losses of its MoE layers."""
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from mmpretrain.models import ImageClassifier
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from torch import Tensor

from ...layers.aux_loss import (DEFAULT_AUX_LOSS_WEIGHTS,
                                check_aux_loss_weights, find_moe_modules,
                                moe_losses)

__all__ = ['MoEImageClassifier', 'DEFAULT_AUX_LOSS_WEIGHTS']

#: The model-zoo metadata that ``mmpretrain.apis.inference_model`` reads to
#: choose its inferencer; ``get_model`` has none for a config's model.
CLASSIFICATION_METAINFO = SimpleNamespace(
    results=[SimpleNamespace(task='Image Classification')])


@MODELS.register_module()
class MoEImageClassifier(ImageClassifier):
    """Image classifier for models with Mixture-of-Experts layers.

    As MMPretrain's ``ImageClassifier``, but :meth:`loss` also collects the
    routing metrics of every MoE layer (a submodule with a ``moe_metrics``
    dict, :func:`~moe_plugin.layers.is_moe_layer`; set by the forward pass)
    and returns:

    - ``loss_cls``: the head's loss (the head's ``loss`` key renamed; its
      other keys are kept).
    - ``loss_moe_aux``: ``sum over layers, sum over k of weight_k *
      metrics[f'{k}_loss']`` for the keys ``k`` of ``aux_loss_weights`` that
      a layer reports (e.g. no ``load_loss`` without router noise); a zero
      tensor if the model has no MoE layer.
    - statistics, under keys without ``loss`` so that MMEngine logs them but
      does not add them to the loss: ``moe_dropped`` (mean fraction of
      dropped assignments over the layers) and per layer
      ``moe.<layer>.dropped`` and ``moe.<layer>.load_cv`` (coefficient of
      variation std / mean, population std, of the per-expert load), where
      ``<layer>`` is the module name without the leading ``backbone.``
      (e.g. ``moe.layers.5.ffn.dropped``).

    Under DDP every rank computes these on its own batch; MMEngine 0.10
    does not reduce logged values across ranks, so the log shows rank 0's
    statistics (the losses' gradients are averaged by DDP as usual).

    See `V-MoE <https://arxiv.org/abs/2106.05974>`_ for the losses.

    Args:
        aux_loss_weights (dict, optional): Weight of each auxiliary loss, keyed
            by its name without ``_loss``: ``importance``, ``load``,
            ``gshard``, ``z``. Missing keys weigh 0. Defaults to V-MoE's
            ``dict(importance=0.005, load=0.005, gshard=0.0, z=0.0)``.
        *args, **kwargs: Arguments of MMPretrain's ``ImageClassifier``
            (``backbone``, ``neck``, ``head``, ``pretrained``, ``train_cfg``,
            ``data_preprocessor``, ``init_cfg``).
    """

    def __init__(self,
                 *args,
                 aux_loss_weights: Optional[Dict[str, float]] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_loss_weights = check_aux_loss_weights(aux_loss_weights)
        self._moe_modules: Optional[List[Tuple[str, nn.Module]]] = None

    @property
    def _metainfo(self):
        """MMPretrain's model-zoo metadata, or :data:`CLASSIFICATION_METAINFO`
        for a model built from a config (so that ``inference_model`` works
        on it)."""
        return self.__dict__.get('_zoo_metainfo') or CLASSIFICATION_METAINFO

    @_metainfo.setter
    def _metainfo(self, value) -> None:
        self.__dict__['_zoo_metainfo'] = value

    @property
    def moe_modules(self) -> List[Tuple[str, nn.Module]]:
        """``(short name, module)`` of every MoE layer, found once."""
        if self._moe_modules is None:
            self._moe_modules = find_moe_modules(self)
        return self._moe_modules

    def loss(self, inputs: Tensor,
             data_samples: List[DataSample]) -> Dict[str, Tensor]:
        """Calculate the losses and routing statistics of a batch.

        Args:
            inputs (Tensor): Images of shape (B, C, H, W).
            data_samples (List[DataSample]): The annotations.

        Returns:
            dict[str, Tensor]: ``loss_cls``, ``loss_moe_aux``, the head's
            other outputs and the routing statistics (see the class
            docstring).
        """
        feats = self.extract_feat(inputs)
        head_losses = self.head.loss(feats, data_samples)
        losses = {
            ('loss_cls' if key == 'loss' else key): value
            for key, value in head_losses.items()
        }
        losses.update(self._moe_losses(inputs.device))
        return losses

    def _moe_losses(self, device: torch.device) -> Dict[str, Tensor]:
        """Turn the MoE layers' ``moe_metrics`` into losses and statistics."""
        return moe_losses(self.moe_modules, self.aux_loss_weights, device)
