"""The one-hot einsum formulation of top-K routing (the V-MoE way).

Slow (``O(S * E * B * D)``) and obvious: a dense combine tensor
``[G, S, E, B]`` built one choice rank at a time, and two einsums. Kept as the
reference the fast index dispatch is tested and benchmarked against.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from .routing import compute_capacity


def einsum_top_k_combine(gates: Tensor,
                         top_k: int,
                         capacity: int,
                         batch_priority: bool = False,
                         renormalize: bool = False) -> Tensor:
    """Combine tensor of token-choice routing with capacity.

    Args:
        gates (Tensor): ``[G, S, E]`` routing probabilities.
        top_k (int): ``K``.
        capacity (int): ``B``.
        batch_priority (bool): Batch Priority Routing. Defaults to False.
        renormalize (bool): renormalise the K weights. Defaults to False.

    Returns:
        Tensor: ``[G, S, E, B]``, the weight of token ``s``'s output from
        slot ``b`` of expert ``e``; its nonzero pattern is the dispatch mask.
    """
    groups, tokens, num_experts = gates.shape
    if batch_priority:
        order = torch.argsort(-gates.max(-1).values, dim=1, stable=True)
        inverse = torch.argsort(order, dim=1)
        sorted_gates = gates.gather(1, order[..., None].expand_as(gates))
        combine = einsum_top_k_combine(sorted_gates, top_k, capacity, False,
                                       renormalize)
        return combine.gather(
            1, inverse[..., None, None].expand_as(combine))
    top_weights, top_experts = gates.topk(top_k, dim=-1)
    if renormalize:
        top_weights = top_weights / top_weights.sum(-1, keepdim=True)
    combine = gates.new_zeros(groups, tokens, num_experts, capacity)
    filled = torch.zeros(groups, 1, num_experts, dtype=torch.long,
                         device=gates.device)
    for rank in range(top_k):
        mask = F.one_hot(top_experts[..., rank], num_experts)  # [G, S, E]
        position = (mask.cumsum(1) - 1 + filled) * mask
        filled = filled + mask.sum(1, keepdim=True)
        within = mask * (position < capacity)
        slot_one_hot = F.one_hot(position.clamp(max=capacity - 1),
                                 capacity) * within[..., None]
        combine = combine + (top_weights[..., rank, None, None] *
                             slot_one_hot.to(gates.dtype))
    return combine


def einsum_top_k_forward(x: Tensor, combine: Tensor, experts) -> Tensor:
    """Dispatch with a one-hot einsum, run the experts, combine.

    Args:
        x (Tensor): ``[G, S, D]`` tokens.
        combine (Tensor): ``[G, S, E, B]`` from :func:`einsum_top_k_combine`.
        experts (callable): ``[E, C, D] -> [E, C, D]``, e.g.
            :class:`~moe_plugin.layers.BatchedExperts`.

    Returns:
        Tensor: ``[G, S, D]``.
    """
    groups, _, num_experts, capacity = combine.shape
    dispatch = (combine > 0).to(x.dtype)
    expert_in = torch.einsum('gsd,gseb->egbd', x, dispatch)
    expert_out = experts(expert_in.reshape(num_experts, groups * capacity, -1))
    expert_out = expert_out.view(num_experts, groups, capacity, -1)
    return torch.einsum('egbd,gseb->gsd', expert_out, combine.to(x.dtype))


def einsum_sparse_moe_forward(layer,
                              x: Tensor,
                              top_k: int,
                              capacity_factor: float,
                              batch_priority: bool = False,
                              group_size=None) -> Tensor:
    """A token-choice ``SparseMoE``'s forward without noise, through the
    one-hot einsum and with the routing options given here, not read from
    the layer (the tests' independent reference for evaluation routing).

    Args:
        layer (SparseMoE): supplies the router and expert weights, the
            capacity rounding and ``renormalize``.
        x (Tensor): ``[B, N, D]`` tokens.
        top_k (int): ``K``.
        capacity_factor (float): ``c``.
        batch_priority (bool): Batch Priority Routing. Defaults to False.
        group_size (int, optional): images per group; None for one image
            per group. Defaults to None.

    Returns:
        Tensor: ``[B, N, D]``.
    """
    images, _, dims = x.shape
    groups = x.reshape(images // (group_size or 1), -1, dims)
    logits = groups.to(layer.router.weight.dtype) @ layer.router.weight.T
    capacity = compute_capacity(groups.shape[1], layer.num_experts, top_k,
                                capacity_factor, None,
                                layer.capacity_multiple_of,
                                layer.capacity_rounding)
    combine = einsum_top_k_combine(logits.softmax(-1), top_k, capacity,
                                   batch_priority, layer.renormalize)
    return einsum_top_k_forward(groups, combine, layer.experts).view_as(x)
