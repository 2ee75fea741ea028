"""The MoE layers' ``moe_metrics`` as losses and logged statistics.

One home for the rule used by :class:`MoEImageClassifier` and by
:class:`~moe_plugin.engine.hooks.MoEAuxLossHook` (detectors, segmentors
and any other model whose code we do not edit).
"""
import numbers
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .base import is_moe_layer

#: The auxiliary losses an MoE layer may report, as ``f'{name}_loss'`` in its
#: ``moe_metrics``, and V-MoE's weights for them.
DEFAULT_AUX_LOSS_WEIGHTS = dict(importance=0.005, load=0.005, gshard=0., z=0.)


def check_aux_loss_weights(
        aux_loss_weights: Optional[Dict[str, float]]) -> Dict[str, float]:
    """Validate ``aux_loss_weights``; None gives V-MoE's defaults.

    Args:
        aux_loss_weights (dict, optional): Weight per loss name without
            ``_loss`` (``importance``, ``load``, ``gshard``, ``z``).

    Returns:
        dict[str, float]: The weights as floats.
    """
    if aux_loss_weights is None:
        aux_loss_weights = DEFAULT_AUX_LOSS_WEIGHTS
    for key, weight in aux_loss_weights.items():
        if key not in DEFAULT_AUX_LOSS_WEIGHTS:
            raise ValueError(
                f'Unknown `aux_loss_weights` key {key!r}; valid keys are '
                f'{list(DEFAULT_AUX_LOSS_WEIGHTS)}')
        if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
                or weight < 0):
            raise ValueError(f'`aux_loss_weights[{key!r}]` must be a '
                             f'number >= 0, got {weight!r}')
    return {key: float(weight) for key, weight in aux_loss_weights.items()}


def find_moe_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(short name, module)`` of every MoE layer (:func:`is_moe_layer`);
    the short name drops a leading ``backbone.``."""
    return [(name[len('backbone.'):] if name.startswith('backbone.') else
             name, module) for name, module in model.named_modules()
            if is_moe_layer(module)]


def moe_losses(modules: List[Tuple[str, nn.Module]],
               aux_loss_weights: Dict[str, float],
               device: torch.device) -> Dict[str, Tensor]:
    """The auxiliary loss and routing statistics of the last forward.

    Args:
        modules (list): ``(short name, module)`` of :func:`find_moe_modules`.
        aux_loss_weights (dict[str, float]): Checked weights.
        device (torch.device): Device of the zero loss of a model without
            MoE layers.

    Returns:
        dict[str, Tensor]: ``loss_moe_aux`` (``sum over layers and k of
        weight_k * metrics[f'{k}_loss']``, a zero tensor without MoE
        layers), and statistics under keys without ``loss`` (logged, not
        added to the loss): ``moe_dropped`` (mean dropped fraction over
        the layers) and per layer ``moe.<name>.dropped`` and
        ``moe.<name>.load_cv`` (std / mean of the per-expert load).
    """
    aux = torch.zeros((), device=device)
    stats = {}
    dropped = []
    for name, module in modules:
        metrics = module.moe_metrics
        for key, weight in aux_loss_weights.items():
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
