"""Expert parallelism over ``torch.distributed``: each rank holds ``E / P``
experts and the static ``[E, C, D]`` buffer is exchanged with an
``all_to_all`` before and after them.

The ``W`` ranks are split in ``W / P`` expert-parallel (EP) groups of ``P``
consecutive ranks (``P = W`` by default). Rank ``q`` of an EP group holds
experts ``[q * E / P, (q + 1) * E / P)``; the ranks at the same position of
every EP group (a *replica group*, ``W / P`` ranks) hold the same experts.

Forward, with ``C`` slots per expert on every rank (``C = G * B``: routing
groups times capacity, so capacity stays per routing group and a token's
output does not depend on ``P`` or ``W``)::

    [E, C, D]  --all_to_all-->  [P, E/P, C, D]  (chunk i from EP rank i)
               --experts-->     [E/P, P * C, D]
               --all_to_all-->  [E, C, D]       (back to the sender)

The exchange is an autograd function whose backward is the same exchange
of the gradients, so a rank's expert gradients sum the contributions of
every rank of its EP group. Every rank of an EP group must send the same
``C`` (equal local batches, which MMEngine's samplers give).

Nothing here happens unless :func:`shard_experts` is called with an EP size
above 1 on an initialised process group: without it, a layer runs exactly
as before. Gradient averaging across ranks (dense parameters over all ranks,
expert parameters over their replica group) is the model wrapper's work
(``moe_plugin.engine.MoEDistributedDataParallel``).
"""
import math
import numbers
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: ``(world_size, ep_size) -> (ep groups, replica groups)``, created once:
#: ``dist.new_group`` is collective, every rank must create every group in
#: the same order.
_GROUPS: Dict[Tuple[int, int], Tuple[list, list]] = {}


def resolve_expert_parallel(expert_parallel: Union[bool, int, None]
                            ) -> Optional[int]:
    """The EP size ``P`` that ``expert_parallel`` asks for, or None for none.

    Args:
        expert_parallel (bool | int | None): False / None / 0: off; True:
            all ranks; an int ``P`` dividing the world size.

    Returns:
        int | None: ``P >= 2``, or None when EP is off, the process group is
        not initialised (e.g. a one-process test of an EP config), or
        ``P == 1`` (nothing to split).
    """
    if expert_parallel is None or expert_parallel is False:
        return None
    if expert_parallel is not True and (
            isinstance(expert_parallel, bool)
            or not isinstance(expert_parallel, numbers.Integral)
            or expert_parallel < 0):
        raise ValueError(f'expert_parallel must be True, False or an '
                         f'expert-parallel size >= 1, got {expert_parallel!r}')
    if expert_parallel == 0 or not (dist.is_available()
                                    and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    size = world if expert_parallel is True else int(expert_parallel)
    if world % size:
        raise ValueError(f'expert_parallel={size} does not divide the world '
                         f'size {world}')
    return size if size > 1 else None


def expert_parallel_groups(size: int) -> Tuple[object, Optional[object]]:
    """This rank's EP group and replica group for an EP size ``size``.

    Returns:
        tuple: the EP group (``size`` consecutive ranks) and the replica
        group (the ``W / size`` ranks holding the same experts), None when
        ``size == W``.
    """
    world = dist.get_world_size()
    key = (world, size)
    if key not in _GROUPS:
        if size == world:
            ep_groups = [dist.group.WORLD]
            replica_groups = [None] * size
        else:
            ep_groups = [
                dist.new_group(list(range(start, start + size)))
                for start in range(0, world, size)
            ]
            replica_groups = [
                dist.new_group(list(range(position, world, size)))
                for position in range(size)
            ]
        _GROUPS[key] = (ep_groups, replica_groups)
    ep_groups, replica_groups = _GROUPS[key]
    rank = dist.get_rank()
    return ep_groups[rank // size], replica_groups[rank % size]


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` with equal splits along dim 0.

    Chunk ``i`` of the input goes to rank ``i`` of the group, chunk ``i`` of
    the output came from rank ``i``. The backward sends each gradient chunk
    back where its value came from: the same exchange.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def all_to_all(x: Tensor, group) -> Tensor:
    """Autograd-aware equal-split ``all_to_all`` along dim 0 in ``group``."""
    return _AllToAll.apply(x, group)


class ExpertShard:
    """Where a rank's experts sit among all of a layer's experts.

    Args:
        num_experts (int): ``E``, experts of the whole layer.
        size (int): ``P``, ranks of the EP group.
        rank (int): this rank's position in its EP group.
        group: the EP process group.
        replica_group: the group of ranks holding the same experts, None
            when EP covers the world.
        world_size (int): ``W``, the data-parallel size.
    """

    def __init__(self, num_experts: int, size: int, rank: int, group,
                 replica_group, world_size: int):
        self.num_experts = num_experts
        self.size = size
        self.rank = rank
        self.group = group
        self.replica_group = replica_group
        self.world_size = world_size
        self.num_local = num_experts // size
        self.offset = rank * self.num_local

    def __deepcopy__(self, memo):
        # A copy of the model (EMA) holds the same experts on the same
        # ranks: it shares the groups.
        return self

    def __getstate__(self):
        raise TypeError(
            'an expert-parallel layer holds a process group and cannot be '
            'pickled; save its state dict instead')

    def __repr__(self) -> str:
        return (f'ExpertShard(experts {self.offset}..'
                f'{self.offset + self.num_local - 1} of {self.num_experts}, '
                f'rank {self.rank} of {self.size})')

    def run(self, compute: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """Exchange ``x [E, C, D]``, ``compute`` on the local experts'
        ``[E/P, P * C, D]``, exchange back to ``[E, C, D]``."""
        experts, slots, dims = x.shape
        if experts != self.num_experts:
            raise ValueError(f'expert buffer has {experts} experts, the '
                             f'layer {self.num_experts}')
        size, local = self.size, self.num_local
        received = all_to_all(x, self.group).view(size, local, slots, dims)
        out = compute(received.transpose(0, 1).reshape(
            local, size * slots, dims))
        out = out.view(local, size, slots, -1).transpose(0, 1)
        return all_to_all(out, self.group).view(experts, slots, -1)

    def gather(self, tensor: Tensor) -> Tensor:
        """The full ``[E, ...]`` tensor from every EP rank's ``[E/P, ...]``
        (collective over the EP group)."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts)

    def slice(self, tensor: Tensor, key: str) -> Tensor:
        """This rank's ``[E/P, ...]`` of a full ``[E, ...]`` tensor."""
        if tensor.ndim == 0 or tensor.shape[0] != self.num_experts:
            raise ValueError(
                f'{key}: checkpoint has {tuple(tensor.shape)} with '
                f'{tensor.shape[0] if tensor.ndim else 0} experts, the model '
                f'{self.num_experts} experts (held {self.num_local} per rank '
                f'over {self.size} expert-parallel ranks)')
        return tensor[self.offset:self.offset + self.num_local]


def _slice_on_load(module: nn.Module, state_dict: dict, prefix: str,
                   *args) -> None:
    """Load pre-hook: slice the full ``[E, ...]`` tensors of the checkpoint
    to this rank's experts."""
    shard = module.expert_shard
    for name, _ in module.named_parameters(recurse=False):
        key = prefix + name
        if key in state_dict:
            state_dict[key] = shard.slice(state_dict[key], key)


def shard_experts(experts: nn.Module,
                  expert_parallel: Union[bool, int, None]
                  ) -> Optional[ExpertShard]:
    """Keep only this rank's experts of a batched-experts module.

    The module's parameters are ``[E, ...]`` (all experts, e.g. freshly
    initialised identically on every rank from the same seed); they become
    this rank's ``[E/P, ...]`` slice, ``module.expert_shard`` is set (its
    forward then exchanges the buffer) and a load pre-hook slices full
    checkpoints. Does nothing when :func:`resolve_expert_parallel` gives
    None.

    Args:
        experts (nn.Module): a :class:`BatchedExperts`.
        expert_parallel (bool | int | None): the layer's setting.

    Returns:
        ExpertShard | None: the shard, or None when EP is off.
    """
    size = resolve_expert_parallel(expert_parallel)
    if size is None:
        return None
    num_experts = experts.num_experts
    if num_experts % size:
        raise ValueError(f'num_experts={num_experts} is not divisible by the '
                         f'expert-parallel size {size}')
    group, replica_group = expert_parallel_groups(size)
    shard = ExpertShard(num_experts, size,
                        dist.get_rank() % size, group, replica_group,
                        dist.get_world_size())
    for name, param in list(experts.named_parameters(recurse=False)):
        local = param.detach()[shard.offset:shard.offset +
                               shard.num_local].clone()
        local = nn.Parameter(local, requires_grad=param.requires_grad)
        local.expert_shard = shard  # for clip_grad_norm_
        setattr(experts, name, local)
    experts.expert_shard = shard
    experts.register_load_state_dict_pre_hook(_slice_on_load)
    return shard


def sharded_experts(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` holding a shard."""
    return [(name, module) for name, module in model.named_modules()
            if getattr(module, 'expert_shard', None) is not None]


def expert_parameters(model: nn.Module
                      ) -> List[Tuple[str, nn.Parameter, ExpertShard]]:
    """``(qualified name, parameter, shard)`` of every sharded parameter."""
    found = []
    for name, module in sharded_experts(model):
        for param_name, param in module.named_parameters(recurse=False):
            full = f'{name}.{param_name}' if name else param_name
            found.append((full, param, module.expert_shard))
    return found


def full_parameter_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """Shapes of ``model``'s parameters and buffers in the checkpoint
    layout: a sharded ``[E/P, ...]`` parameter counts as ``[E, ...]``."""
    shapes = {name: tuple(t.shape) for name, t in model.named_parameters()}
    shapes.update(
        (name, tuple(t.shape)) for name, t in model.named_buffers())
    for name, param, shard in expert_parameters(model):
        shapes[name] = (shard.num_experts, *param.shape[1:])
    return shapes


def clip_grad_norm_(parameters,
                    max_norm: float,
                    norm_type: float = 2.0,
                    error_if_nonfinite: bool = False,
                    foreach: Optional[bool] = None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model, of which
    this rank holds only some experts.

    The norm of the sharded expert gradients (parameters with an
    ``expert_shard``) is reduced over each EP group, so that every rank
    finds the norm of the whole model's gradient and clips by the same
    factor (a rank-local norm would clip the shared dense parameters
    differently on each rank). Expert gradients must already be the same
    on the replicas (``MoEDistributedDataParallel`` does it). Without
    sharded parameters it is torch's function.

    Args:
        parameters (Iterable[Tensor]): as torch's.
        max_norm (float): as torch's.
        norm_type (float): as torch's (``inf`` for the max norm).
            Defaults to 2.
        error_if_nonfinite (bool): as torch's. Defaults to False.
        foreach (bool, optional): as torch's. Defaults to None.

    Returns:
        Tensor: the total norm of the whole model's gradients.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    groups: Dict[int, Tuple[ExpertShard, list]] = {}
    dense = []
    for param in params:
        shard = getattr(param, 'expert_shard', None)
        if shard is None:
            dense.append(param)
        else:
            groups.setdefault(id(shard.group), (shard, []))[1].append(param)
    if not groups:
        return torch.nn.utils.clip_grad_norm_(
            params, max_norm, norm_type, error_if_nonfinite, foreach)
    norm_type = float(norm_type)
    device = params[0].grad.device
    norms = [_local_norm(dense, norm_type, device)]
    # The same order on every rank: groups by EP size, then by position.
    for shard, members in sorted(groups.values(),
                                 key=lambda g: (g[0].size, g[0].offset)):
        local = _local_norm(members, norm_type, device)
        if norm_type == math.inf:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=shard.group)
        else:
            local = local.pow(norm_type)
            dist.all_reduce(local, group=shard.group)
            local = local.pow(1.0 / norm_type)
        norms.append(local)
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f'the total norm of order {norm_type} of the gradients is '
            f'{total.item()}, which is not finite')
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for param in params:
        param.grad.detach().mul_(coef.to(param.grad.device))
    return total


def _local_norm(params, norm_type: float, device) -> Tensor:
    if not params:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(
        torch.stack([
            torch.linalg.vector_norm(p.grad.detach(), norm_type).to(device)
            for p in params
        ]), norm_type)
