"""The model wrapper of expert-parallel training, and the config switch that
picks it.

With expert parallelism (``moe_cfg=dict(..., expert_parallel=True)``, see
:mod:`moe_plugin.layers.expert_parallel`) a rank holds only some experts, so
DDP's rule "average every gradient over all ranks, broadcast rank 0's
weights at the start" would average different experts with each other and
give every rank rank 0's experts. :class:`MoEDistributedDataParallel` leaves
the expert parameters out of DDP and reduces their gradients itself.
"""
from functools import partial
from typing import Optional

import torch.distributed as dist
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from moe_plugin.layers.expert_parallel import ExpertShard, expert_parameters

#: The wrapper :func:`configure_expert_parallel` puts into a config.
WRAPPER_TYPE = 'MoEDistributedDataParallel'
#: The hook it adds (``moe_plugin.engine.hooks.ExpertParallelHook``).
HOOK_TYPE = 'ExpertParallelHook'


def _expert_gradient(shard: ExpertShard, grad: Tensor) -> Tensor:
    """One backward's gradient of a sharded expert parameter, averaged as
    DDP averages the dense ones.

    The ``all_to_all`` backward has already summed the contributions of
    the EP group's ``P`` ranks; the replica group's ``W / P`` ranks hold
    the same experts and are summed here; dividing by ``W`` makes it the
    gradient of the mean of the ranks' losses.
    """
    grad = grad / shard.world_size
    if shard.replica_group is not None:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=shard.replica_group)
    return grad


@MODEL_WRAPPERS.register_module()
class MoEDistributedDataParallel(MMDistributedDataParallel):
    """MMEngine's DDP wrapper for models with expert-parallel MoE layers.

    - Dense parameters: DDP as usual (broadcast from rank 0 at the start,
      gradients averaged over all ranks).
    - Expert parameters held as shards (``BatchedExperts.expert_shard``):
      left out of DDP; each backward's gradient is summed over the ranks
      holding the same experts (none when EP covers the world) and divided
      by the world size.

    Without sharded experts it is ``MMDistributedDataParallel``.

    Args:
        module (nn.Module): The model.
        detect_anomalous_params (bool): As in
            ``MMDistributedDataParallel``. Defaults to False.
        **kwargs: ``DistributedDataParallel``'s arguments
            (``device_ids``, ``broadcast_buffers``, ...).
    """

    def __init__(self, module, detect_anomalous_params: bool = False,
                 **kwargs):
        experts = expert_parameters(module)
        if experts:
            ignored = list(
                getattr(module, '_ddp_params_and_buffers_to_ignore', []))
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(  # noqa: E501
                module, ignored + [name for name, _, _ in experts])
        super().__init__(
            module=module,
            detect_anomalous_params=detect_anomalous_params,
            **kwargs)
        self._expert_grad_hooks = [
            param.register_hook(partial(_expert_gradient, shard))
            for _, param, shard in experts if param.requires_grad
        ]
        if experts:
            shards = sorted({repr(shard) for _, _, shard in experts})
            print_log(
                f'Expert parallelism: {len(experts)} expert tensors held as '
                f'shards on rank {dist.get_rank()}: {", ".join(shards)}',
                logger='current')


def _enables_expert_parallel(cfg) -> bool:
    """Whether a (model) config sets ``expert_parallel`` anywhere."""
    if isinstance(cfg, dict):
        value = cfg.get('expert_parallel')
        if value is not None and value is not False and value != 0:
            return True
        return any(_enables_expert_parallel(v) for v in cfg.values())
    if isinstance(cfg, (list, tuple)):
        return any(_enables_expert_parallel(v) for v in cfg)
    return False


def configure_expert_parallel(cfg) -> bool:
    """Make a run config with expert parallelism train correctly.

    If ``cfg.model`` sets ``expert_parallel`` anywhere, the model wrapper
    becomes :class:`MoEDistributedDataParallel` (a config that names
    another wrapper raises ``ValueError``) and ``ExpertParallelHook`` (full
    experts in the checkpoints) joins ``custom_hooks``. Call it before the
    ``Runner`` is built; it changes nothing in a config without EP.

    Args:
        cfg (mmengine.Config): The run's config.

    Returns:
        bool: Whether the config uses expert parallelism.
    """
    if not _enables_expert_parallel(cfg.get('model')):
        return False
    wrapper_cfg: Optional[dict] = cfg.get('model_wrapper_cfg', None)
    if wrapper_cfg is None:
        cfg.model_wrapper_cfg = dict(type=WRAPPER_TYPE)
    else:
        wrapper = MODEL_WRAPPERS.get(wrapper_cfg.get('type', ''))
        if not (isinstance(wrapper, type)
                and issubclass(wrapper, MoEDistributedDataParallel)):
            raise ValueError(
                f'the model uses expert_parallel, which needs model_wrapper_'
                f'cfg type={WRAPPER_TYPE!r} (DDP would average different '
                f"experts' gradients), got {wrapper_cfg.get('type')!r}")
    hooks = cfg.get('custom_hooks', None) or []
    if not isinstance(hooks, (list, tuple)) or not all(
            isinstance(h, dict) for h in hooks):
        raise ValueError(f'custom_hooks must be a list of hook configs, got '
                         f'{hooks!r}')
    hooks = list(hooks)
    if not any(h.get('type') == HOOK_TYPE for h in hooks):
        hooks.append(dict(type=HOOK_TYPE))
        cfg.custom_hooks = hooks
    return True
