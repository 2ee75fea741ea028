"""Checkpoints of expert-parallel runs hold every expert, in the usual
layout, whatever the number of ranks that wrote them.

An expert-parallel rank holds ``[E/P, ...]`` of each expert tensor, and
MMEngine builds and writes the checkpoint on rank 0 alone. Where a
checkpoint is about to be written, this hook gathers the shards of the
weights and of their optimizer state (Adam's moments) on rank 0 from the
first EP group (the other groups hold copies), and puts the full tensors
into the checkpoint. On resume it slices the optimizer state to the ranks'
experts; the weights are sliced by the experts' own load pre-hook. A
checkpoint written on ``W`` ranks thus resumes on ``W'`` ranks, loads in one
process (``tools/test.py``) and feeds the converters and the recycling tool
as any other.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from mmengine.dist import broadcast
from mmengine.hooks import EMAHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmpretrain.registry import HOOKS

from moe_plugin.layers.expert_parallel import (ExpertShard, clip_grad_norm_,
                                               expert_parameters)

from .checkpoint_due import (best_checkpoint_possible,
                             checkpoint_due_after_epoch,
                             checkpoint_due_after_iter)


def _optimizer_indices(optimizer: torch.optim.Optimizer) -> Dict[int, int]:
    """``id(param) -> key`` of ``optimizer.state_dict()['state']`` (the
    numbering of ``torch.optim.Optimizer.state_dict``)."""
    indices, start = {}, 0
    for group in optimizer.param_groups:
        for i, param in enumerate(group['params'], start):
            indices.setdefault(id(param), i)
        start += len(group['params'])
    return indices


def _is_expert_state(value, param) -> bool:
    """An optimizer state tensor shaped like its (sharded) parameter."""
    return torch.is_tensor(value) and value.shape == param.shape


@HOOKS.register_module()
class ExpertParallelHook(Hook):
    """Full experts in the checkpoints of expert-parallel runs.

    ``tools/train.py`` adds it when the model sets ``expert_parallel``
    (:func:`moe_plugin.engine.configure_expert_parallel`). Without sharded
    experts (one process, EP off) it does nothing.

    - Before :class:`~mmengine.hooks.CheckpointHook` writes a checkpoint
      (every ``interval``, the last one, and after each validation when a
      ``save_best`` is set) the ranks of the first EP group gather their
      experts' weights and optimizer states on rank 0, which swaps them into
      the checkpoint (``state_dict`` and ``optimizer``).
    - On resume, each rank's optimizer state gets its experts' slice.
    - ``Runner._init_model_weights`` of MMEngine 0.10 broadcasts every
      tensor of the state dict from rank 0 after ``init_weights``, which
      would give every rank rank 0's experts: before the run starts the hook
      makes this runner broadcast all but the sharded tensors.
    - Gradient clipping by norm uses the norm of the whole model's gradient
      (:func:`~moe_plugin.layers.expert_parallel.clip_grad_norm_`), the
      same on every rank.

    A checkpoint of a sharded model written without the gathering (e.g. by
    a direct ``runner.save_checkpoint``) raises ``RuntimeError`` rather than
    writing shards; an ``EMAHook`` raises ``ValueError`` (its copy would be
    saved as shards).
    """

    # Before CheckpointHook (VERY_LOW) in after_train_iter/epoch/val_epoch.
    priority = 'LOW'

    def __init__(self):
        self._gathered: Optional[Tuple[Dict, Dict]] = None
        self._gathered_at: Optional[int] = None

    @staticmethod
    def _model(runner):
        model = runner.model
        return model.module if is_model_wrapper(model) else model

    @staticmethod
    def _optimizer(runner) -> Optional[torch.optim.Optimizer]:
        wrapper = getattr(runner, 'optim_wrapper', None)
        if isinstance(wrapper, OptimWrapper):
            return wrapper.optimizer
        if wrapper is None or isinstance(wrapper, dict):
            return None
        raise ValueError(
            f'ExpertParallelHook supports one OptimWrapper, got '
            f'{type(wrapper).__name__}')

    # -- initialisation ----------------------------------------------------
    def before_run(self, runner) -> None:
        if not expert_parameters(self._model(runner)):
            return
        ema = [
            type(h).__name__ for h in runner.hooks if isinstance(h, EMAHook)
        ]
        if ema:
            raise ValueError(
                f'{ema[0]} with expert parallelism is not supported: its '
                'averaged copy holds this rank\'s experts only and would be '
                'saved as shards; train without it or without '
                'expert_parallel')

        def init_model_weights():
            # MMEngine's Runner._init_model_weights, less the shards.
            model = self._model(runner)
            if hasattr(model, 'init_weights'):
                model.init_weights()
                sharded = {name for name, _, _ in expert_parameters(model)}
                for name, tensor in model.state_dict().items():
                    if name not in sharded:
                        broadcast(tensor)

        runner._init_model_weights = init_model_weights
        wrapper = getattr(runner, 'optim_wrapper', None)
        if (isinstance(wrapper, OptimWrapper) and getattr(
                wrapper, 'clip_func', None) is torch.nn.utils.clip_grad_norm_):
            wrapper.clip_func = clip_grad_norm_

    # -- saving ------------------------------------------------------------
    def _gather(self, runner) -> None:
        """Collective over the first EP group: full experts on rank 0."""
        experts = expert_parameters(self._model(runner))
        if not experts:
            return
        optimizer = self._optimizer(runner)
        indices = _optimizer_indices(optimizer) if optimizer else {}
        weights, states = {}, {}
        for name, param, shard in experts:
            if dist.get_rank() >= shard.size:
                continue  # another EP group: a copy of the first's experts
            weights[name] = _gather_to_rank0(param.detach(), shard)
            state = optimizer.state.get(param, {}) if optimizer else {}
            for key in sorted(state):
                if _is_expert_state(state[key], param):
                    full = _gather_to_rank0(state[key], shard)
                    states.setdefault(indices[id(param)], {})[key] = full
        self._gathered = (weights, states)
        self._gathered_at = runner.iter

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        if checkpoint_due_after_iter(runner):
            self._gather(runner)

    def after_train_epoch(self, runner) -> None:
        if checkpoint_due_after_epoch(runner):
            self._gather(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        if best_checkpoint_possible(runner):
            self._gather(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # Rank 0 only (Runner.save_checkpoint is master_only).
        experts = expert_parameters(self._model(runner))
        if not experts:
            return
        if self._gathered is None or self._gathered_at != runner.iter:
            raise RuntimeError(
                f'checkpoint at iteration {runner.iter} of an expert-'
                f'parallel model: its experts were not gathered (only '
                f'CheckpointHook saves are); it would hold shards')
        weights, states = self._gathered
        state_dict = checkpoint['state_dict']
        for name, tensor in weights.items():
            assert name in state_dict, name
            state_dict[name] = tensor.cpu()
        if 'optimizer' in checkpoint:  # not in the best checkpoints
            optimizer_state = checkpoint['optimizer']['state']
            for index, tensors in states.items():
                for key, tensor in tensors.items():
                    optimizer_state[index][key] = tensor.cpu()
        self._gathered = None

    # -- resuming ----------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Slice the expert optimizer states of a resumed checkpoint (the
        weights are sliced by the experts' load pre-hook)."""
        if not getattr(runner, '_resume', False):
            return
        experts = expert_parameters(self._model(runner))
        optimizer = self._optimizer(runner)
        saved = checkpoint.get('optimizer', {}).get('state')
        if not experts or optimizer is None or saved is None:
            return
        indices = _optimizer_indices(optimizer)
        for name, param, shard in experts:
            state = saved.get(indices[id(param)], {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.ndim == param.ndim:
                    state[key] = shard.slice(value,
                                             f'optimizer state {key} of '
                                             f'{name}')


def _gather_to_rank0(tensor, shard: ExpertShard):
    """Rank 0 gets the ``[E, ...]`` of the first EP group (its ranks are
    ``0 .. P - 1``); the other ranks get None."""
    tensor = tensor.contiguous()
    parts = ([torch.empty_like(tensor) for _ in range(shard.size)]
             if dist.get_rank() == 0 else None)
    dist.gather(tensor, parts, dst=0, group=shard.group)
    return torch.cat(parts) if parts is not None else None
