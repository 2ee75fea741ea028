"""Soft MoE: every slot is a softmax-weighted mix of one image's tokens.

From "From Sparse to Soft Mixtures of Experts" (arXiv 2308.00951), to the
equation of google-research/vmoe ``vmoe/projects/soft_moe/router.py``:

- ``X^ = X / sqrt(|X|^2 + 1e-6)`` per token, ``Phi^ = Phi / sqrt(|Phi|^2 +
  1e-6)`` per slot column; logits ``L = scale * X^ Phi^``, ``[B, N, E, p]``.
- dispatch ``D = softmax`` over the N tokens of each image (per slot);
  combine ``C = softmax`` over all ``E * p`` slots (per token).
- slot inputs ``X~ = D^T X`` (the raw tokens), ``Y~ = f_e(X~)``, outputs
  ``Y = C Y~``.

No token is dropped, there is no auxiliary loss, and an image's output does
not depend on its batch neighbours. The routing maths runs in float32 under
autocast; the experts run in the autocast dtype.

Parameter names follow vmoe's: ``mu`` (``[D, E, p]``, vmoe's ``Router/mu``)
and ``scale``; the experts are :class:`BatchedExperts`.
"""
import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .base import MoELayer
from .experts import BatchedExperts


def l2_normalize(x: Tensor, dim: int, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(sum(x^2) + eps)`` along ``dim`` (vmoe's normalisation)."""
    return x * torch.rsqrt(x.square().sum(dim, keepdim=True) + eps)


def resolve_slots_per_expert(num_experts: int,
                             slots_per_expert: Optional[int],
                             capacity_factor: Optional[float],
                             num_tokens: Optional[int]) -> int:
    """Slots per expert ``p``: given, or ``round(N * c / E)`` (half to even).

    Args:
        num_experts (int): ``E``.
        slots_per_expert (int, optional): ``p``.
        capacity_factor (float, optional): ``c``; overrides
            ``slots_per_expert`` when given.
        num_tokens (int, optional): ``N``, tokens per image; needed with
            ``capacity_factor``.

    Returns:
        int: ``p >= 1``.
    """
    if capacity_factor is not None:
        if capacity_factor <= 0:
            raise ValueError(
                f'capacity_factor must be > 0, got {capacity_factor}')
        if num_tokens is None:
            raise ValueError(
                f'capacity_factor={capacity_factor} needs num_tokens (tokens '
                'per image) to give the slots per expert; the backbone fills '
                'it in, or give slots_per_expert')
        slots = int(round(num_tokens * capacity_factor / num_experts))
        if slots < 1:
            raise ValueError(
                f'capacity_factor={capacity_factor} gives {slots} slots per '
                f'expert for {num_tokens} tokens and {num_experts} experts; '
                'it must give >= 1')
        return slots
    if (slots_per_expert is None or isinstance(slots_per_expert, bool)
            or int(slots_per_expert) != slots_per_expert
            or slots_per_expert < 1):
        raise ValueError(
            f'slots_per_expert must be an integer >= 1, got '
            f'{slots_per_expert!r}')
    return int(slots_per_expert)


def tokens_to_slots(dispatch: Tensor, x: Tensor) -> Tensor:
    """Slot inputs, each a dispatch-weighted mix of one image's tokens.

    Args:
        dispatch (Tensor): ``[B, N, E, p]`` weights (float32 or float64).
        x (Tensor): ``[B, N, D]`` tokens.

    Returns:
        Tensor: ``[E, B * p, D]`` in ``x``'s dtype, mixed in the weights'.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        slots = torch.einsum('bnep,bnd->ebpd', dispatch, x.to(dispatch.dtype))
    return slots.reshape(dispatch.shape[2], -1, x.shape[-1]).to(x.dtype)


def slots_to_tokens(combine: Tensor, out: Tensor, images: int) -> Tensor:
    """Token outputs, each a combine-weighted sum of all slot outputs.

    Args:
        combine (Tensor): ``[B, N, E * p]`` weights.
        out (Tensor): ``[E, B * p, D]`` expert outputs.
        images (int): ``B``.

    Returns:
        Tensor: ``[B, N, D]``.
    """
    num_experts, _, dims = out.shape
    out = out.view(num_experts, images, -1, dims).permute(1, 0, 2, 3)
    return torch.bmm(combine.to(out.dtype), out.reshape(images, -1, dims))


def expert_share(combine: Tensor, num_experts: int) -> Tensor:
    """Share of the combine weight each expert received.

    Args:
        combine (Tensor): ``[B, N, E * p]`` combine weights.
        num_experts (int): ``E``.

    Returns:
        Tensor: ``[E]``, sums to 1.
    """
    with torch.no_grad():
        per_expert = combine.float().reshape(
            *combine.shape[:2], num_experts, -1).sum((0, 1, 3))
        return per_expert / per_expert.sum()


class SoftMoE(MoELayer):
    """Soft Mixture of MLP experts, a drop-in for a ViT block's MLP.

    A paper implementation of `From Sparse to Soft Mixtures of Experts
    <https://arxiv.org/abs/2308.00951>`_. Each of the ``E * p`` slots takes a
    softmax-weighted average of one image's tokens, each expert processes
    its ``p`` slots, and each token receives a softmax-weighted average of
    all slot outputs. The layer adds no residual: the block around it does.

    Args:
        embed_dims (int): Token width ``D``.
        feedforward_channels (int): Hidden width ``H`` of each expert.
        num_experts (int): ``E``. Defaults to 128.
        slots_per_expert (int): ``p``. Defaults to 1.
        capacity_factor (float, optional): ``c``: ``p = round(N * c / E)``
            instead of ``slots_per_expert``. Defaults to None.
        num_tokens (int, optional): Tokens per image ``N``, needed with
            ``capacity_factor`` (``VisionMoE`` fills it in).
            Defaults to None.
        act (str): 'gelu_tanh' or 'gelu'. Defaults to 'gelu_tanh'.
        expert_drop (float): Dropout inside each expert. Defaults to 0.
        expert_parallel (bool | int): Hold ``E / P`` experts per rank and
            exchange the slot buffer with ``all_to_all`` (see
            :class:`~moe_plugin.layers.SparseMoE`). Defaults to False.
    """

    def __init__(self,
                 embed_dims: int,
                 feedforward_channels: int,
                 num_experts: int = 128,
                 slots_per_expert: int = 1,
                 capacity_factor: Optional[float] = None,
                 num_tokens: Optional[int] = None,
                 act: str = 'gelu_tanh',
                 expert_drop: float = 0.0,
                 expert_parallel: Union[bool, int] = False):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f'num_experts must be >= 1, got {num_experts}')
        self.num_experts = num_experts
        self.slots_per_expert = resolve_slots_per_expert(
            num_experts, slots_per_expert, capacity_factor, num_tokens)
        self.mu = nn.Parameter(
            torch.empty(embed_dims, num_experts, self.slots_per_expert))
        self.scale = nn.Parameter(torch.ones(()))
        self.experts = BatchedExperts(num_experts, embed_dims,
                                      feedforward_channels, act, expert_drop)
        self.reset_parameters()
        # After the initialisation: every rank draws the same parameters.
        self.shard_experts(expert_parallel)

    def reset_parameters(self):
        """LeCun-normal ``mu`` (fan-in ``D``), as vmoe; ``scale`` = 1."""
        nn.init.normal_(self.mu, std=1.0 / math.sqrt(self.mu.shape[0]))
        nn.init.ones_(self.scale)

    def routing_weights(self, x: Tensor):
        """Dispatch and combine weights, in float32 (float64 stays).

        Args:
            x (Tensor): ``[B, N, D]`` tokens.

        Returns:
            tuple: ``dispatch [B, N, E, p]`` (sums to 1 over N) and
            ``combine [B, N, E * p]`` (sums to 1 over the slots).
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            keys = l2_normalize(x.to(dtype), -1)
            queries = l2_normalize(self.mu.to(dtype), 0)
            logits = self.scale.to(dtype) * torch.einsum(
                'bnd,dep->bnep', keys, queries)
            dispatch = logits.softmax(1)
            combine = logits.flatten(2).softmax(-1)
        return dispatch, combine

    def forward(self, x: Tensor) -> Tensor:
        """Mix tokens into slots, run the experts, mix slots into tokens.

        Args:
            x (Tensor): ``[B, N, D]`` tokens.

        Returns:
            Tensor: ``[B, N, D]``; sets ``self.moe_metrics`` (``expert_load``:
            ``[E]``, each expert's share of the combine weight).
        """
        dispatch, combine = self.routing_weights(x)
        out = self.experts(tokens_to_slots(dispatch, x))
        y = slots_to_tokens(combine, out, x.shape[0])
        self.moe_metrics = {
            'expert_load': expert_share(combine, self.num_experts)
        }
        return y

    def extra_repr(self) -> str:
        return (f'num_experts={self.num_experts}, '
                f'slots_per_expert={self.slots_per_expert}')
