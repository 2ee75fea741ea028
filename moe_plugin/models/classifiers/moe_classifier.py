"""An image classifier that adds the auxiliary losses of its MoE layers."""
import numbers
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from mmpretrain.models import ImageClassifier
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from torch import Tensor

from moe_plugin.layers import is_moe_layer

#: The auxiliary losses an MoE layer may report, as ``f'{name}_loss'`` in its
#: ``moe_metrics``, and V-MoE's weights for them.
DEFAULT_AUX_LOSS_WEIGHTS = dict(importance=0.005, load=0.005, gshard=0., z=0.)

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
        if aux_loss_weights is None:
            aux_loss_weights = DEFAULT_AUX_LOSS_WEIGHTS
        for key, weight in aux_loss_weights.items():
            if key not in DEFAULT_AUX_LOSS_WEIGHTS:
                raise ValueError(
                    f'Unknown `aux_loss_weights` key {key!r}; valid keys are '
                    f'{list(DEFAULT_AUX_LOSS_WEIGHTS)}')
            if (isinstance(weight, bool)
                    or not isinstance(weight, numbers.Real) or weight < 0):
                raise ValueError(f'`aux_loss_weights[{key!r}]` must be a '
                                 f'number >= 0, got {weight!r}')
        self.aux_loss_weights = {
            key: float(weight)
            for key, weight in aux_loss_weights.items()
        }
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
            self._moe_modules = [
                (name[len('backbone.'):]
                 if name.startswith('backbone.') else name, module)
                for name, module in self.named_modules()
                if is_moe_layer(module)
            ]
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
        aux = torch.zeros((), device=device)
        stats = {}
        dropped = []
        for name, module in self.moe_modules:
            metrics = module.moe_metrics
            for key, weight in self.aux_loss_weights.items():
                value = metrics.get(f'{key}_loss')
                if value is not None and weight != 0:
                    aux = aux + weight * value
            if 'dropped_fraction' in metrics:
                fraction = metrics['dropped_fraction'].detach()
                dropped.append(fraction)
                stats[f'moe.{name}.dropped'] = fraction
            if 'expert_load' in metrics:
                load = metrics['expert_load'].detach().float()
                stats[f'moe.{name}.load_cv'] = (
                    load.std(unbiased=False) / load.mean().clamp_min(1e-12))
        result = dict(loss_moe_aux=aux)
        if dropped:
            result['moe_dropped'] = torch.stack(dropped).mean()
        result.update(stats)
        return result
