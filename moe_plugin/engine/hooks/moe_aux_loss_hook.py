"""Add the MoE auxiliary loss to any model's loss dict, its code unedited.

MMDetection's detectors and MMSegmentation's segmentors return their loss
dict from ``forward(..., mode='loss')`` and know nothing of MoE layers. A
forward hook on the model (the module inside a DDP wrapper) appends
``loss_moe_aux`` and the routing statistics to that dict, so MMEngine's
``parse_losses`` sums the loss and logs the statistics, and DDP, which
calls the inner module, sees the loss as part of the output.
"""
from typing import Dict, Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmpretrain.registry import HOOKS
from torch import nn
from torch.utils.hooks import RemovableHandle

from ...layers.aux_loss import (check_aux_loss_weights, find_moe_modules,
                                moe_losses)


def add_moe_aux_loss(model: nn.Module,
                     aux_loss_weights: Optional[Dict[str, float]] = None
                     ) -> RemovableHandle:
    """Make ``model(..., mode='loss')`` return ``loss_moe_aux`` too.

    Args:
        model (nn.Module): An MMEngine model (not its DDP wrapper) whose
            ``forward(inputs, data_samples, mode='loss')`` returns a dict.
        aux_loss_weights (dict, optional): Weight per auxiliary loss, keyed
            ``importance``, ``load``, ``gshard``, ``z``. Defaults to None
            (V-MoE's 0.005, 0.005, 0, 0).

    Returns:
        RemovableHandle: ``.remove()`` undoes it.
    """
    if is_model_wrapper(model):
        raise ValueError('add_moe_aux_loss takes the model itself, not its '
                         f'{type(model).__name__} wrapper (use .module)')
    weights = check_aux_loss_weights(aux_loss_weights)
    modules = find_moe_modules(model)

    def hook(module, args, kwargs, output):
        mode = kwargs.get('mode', args[2] if len(args) > 2 else 'tensor')
        if mode != 'loss' or not isinstance(output, dict):
            return None
        inputs = kwargs.get('inputs', args[0] if args else None)
        device = getattr(inputs, 'device', None)
        if device is None:
            device = next(model.parameters()).device
        clash = {'loss_moe_aux', 'moe_dropped'} & set(output)
        if clash:
            raise KeyError(f'the loss dict of {type(model).__name__} already '
                           f'has {sorted(clash)}')
        output.update(moe_losses(modules, weights, device))
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


@HOOKS.register_module()
class MoEAuxLossHook(Hook):
    """Add ``loss_moe_aux`` and routing statistics to the training losses.

    For models that do not add them themselves (detectors, segmentors;
    ``MoEImageClassifier`` already does and must not get this hook). Put
    it in the config's ``custom_hooks``::

        custom_hooks = [dict(type='MoEAuxLossHook')]

    Before training it registers a forward hook (:func:`add_moe_aux_loss`)
    on the model, inside its DDP (or ``MoEDistributedDataParallel``)
    wrapper. The loss is ``sum over MoE layers and k of weight_k *
    metrics[f'{k}_loss']``; the statistics are logged as
    ``moe_dropped``, ``moe.<layer>.dropped`` and ``moe.<layer>.load_cv``
    (rank 0's, as MMEngine does not reduce logs over ranks).

    Args:
        aux_loss_weights (dict, optional): Weight per auxiliary loss
            (``importance``, ``load``, ``gshard``, ``z``). Defaults to
            None (V-MoE's 0.005, 0.005, 0, 0).
    """
    priority = 'NORMAL'

    def __init__(self, aux_loss_weights: Optional[Dict[str, float]] = None):
        self.aux_loss_weights = check_aux_loss_weights(aux_loss_weights)
        self._handle: Optional[RemovableHandle] = None

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        if hasattr(model, 'aux_loss_weights'):
            raise ValueError(
                f'{type(model).__name__} adds the MoE auxiliary loss itself; '
                'remove MoEAuxLossHook from custom_hooks')
        if not find_moe_modules(model):
            raise ValueError(
                f'MoEAuxLossHook: {type(model).__name__} has no MoE layer '
                '(no module with `moe_metrics`); remove the hook')
        self._handle = add_moe_aux_loss(model, self.aux_loss_weights)

    def after_train(self, runner) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
