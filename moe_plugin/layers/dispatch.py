"""Static-shape index dispatch and combine for sparse MoE layers.

Tokens are copied into a padded expert buffer ``[E, C, D]`` (``C`` slots per
expert, ``C = G * B`` for ``G`` groups of capacity ``B``) by a gather, and
the experts' outputs are brought back by a gather (token choice) or an
``index_add`` (expert choice). Every shape depends only on ``(N, E, C, K)``,
never on the routing decisions: no host synchronisation, no data-dependent
shapes, so the layer compiles as one graph and the buffer is ready for an
``all_to_all`` between devices (expert parallelism).
"""
from typing import Optional

import torch
from torch import Tensor


def weighted_choice_sum(values: Tensor, weights: Tensor) -> Tensor:
    """``sum_k values[:, k] * weights[:, k]``, one choice at a time.

    Equal, bit for bit, to ``(values * weights.unsqueeze(-1)).sum(1)`` for
    ``K <= 2`` (a product, then one addition): without its ``[N, K, D]``
    temporary and the reduction's zero fill, one pass less over the tokens.

    Args:
        values (Tensor): ``[N, K, D]``.
        weights (Tensor): ``[N, K]``, in ``values``' dtype.

    Returns:
        Tensor: ``[N, D]``.
    """
    out = values[:, 0] * weights[:, :1]
    for choice in range(1, values.shape[1]):
        out += values[:, choice] * weights[:, choice:choice + 1]
    return out


class _DispatchTokens(torch.autograd.Function):
    """``buffer = pad(x)[slot_token]`` whose backward is a gather, not a
    scatter-add: token ``n``'s gradient is the sum of its kept slots'.

    ``slot_token == N`` marks an empty slot, which reads a zero row.
    """

    @staticmethod
    def forward(ctx, x, slot_token, slot_index, kept):
        ctx.save_for_backward(slot_index, kept)
        padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
        return padded.index_select(0, slot_token)

    @staticmethod
    def backward(ctx, grad_buffer):
        slot_index, kept = ctx.saved_tensors
        num_tokens, top_k = slot_index.shape
        grad = grad_buffer.index_select(0, slot_index.reshape(-1))
        grad = weighted_choice_sum(
            grad.view(num_tokens, top_k, -1), kept.to(grad.dtype))
        return grad, None, None, None


class _CombineSlots(torch.autograd.Function):
    """``y[n] = sum_k w[n, k] * out[slot_index[n, k]]`` whose backward is a
    gather: slot ``j``'s gradient is its owner's weight times the owner's
    output gradient.
    """

    @staticmethod
    def forward(ctx, out, weights, slot_index, slot_token, slot_pair):
        num_tokens, top_k = slot_index.shape
        gathered = out.index_select(0, slot_index.reshape(-1)).view(
            num_tokens, top_k, -1)
        ctx.save_for_backward(gathered, weights, slot_token, slot_pair)
        return weighted_choice_sum(gathered, weights.to(out.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        gathered, weights, slot_token, slot_pair = ctx.saved_tensors
        grad_out = grad_weights = None
        if ctx.needs_input_grad[0]:
            num_tokens = grad_y.shape[0]
            # Empty slots (token N, pair N * K) get weight 0.
            pair_weights = torch.cat([weights.reshape(-1),
                                      weights.new_zeros(1)])
            slot_weights = pair_weights.index_select(0, slot_pair)
            owner = slot_token.clamp(max=num_tokens - 1)
            grad_out = grad_y.index_select(0, owner) * slot_weights.unsqueeze(
                -1).to(grad_y.dtype)
        if ctx.needs_input_grad[1]:
            grad_weights = (gathered * grad_y.unsqueeze(1)).sum(-1).to(
                weights.dtype)
        return grad_out, grad_weights, None, None, None


class IndexDispatcher:
    """Moves tokens between ``[N, D]`` and the expert buffer ``[E, C, D]``.

    Token choice gives ``slot_pair`` (and ``slot_index``, ``kept``,
    ``combine_weights``): both directions and their backward passes are then
    gathers, with no scatter-add (slow on CPUs, atomic on GPUs). Expert
    choice gives ``slot_weights``: every slot is filled and the outputs are
    added back to their tokens with ``index_add``.

    Args:
        slot_token (Tensor): ``[E, C]`` long, the flat token copied into
            each slot; ``N`` marks an empty slot (it holds zeros).
        num_tokens (int): ``N``, the number of tokens over all groups.
        slot_pair (Tensor, optional): ``[E, C]`` long, the (token, choice)
            pair ``n * K + k`` that owns each slot; ``N * K`` if empty.
            Defaults to None.
        slot_index (Tensor, optional): ``[N, K]`` long, the flat slot (in
            ``[0, E * C)``) each (token, choice) reads its output from;
            dropped choices point at slot 0 with weight 0. Defaults to None.
        kept (Tensor, optional): ``[N, K]`` bool, the choice has a slot.
            Defaults to None.
        combine_weights (Tensor, optional): ``[N, K]`` weight of each
            (token, choice); 0 for dropped choices. Defaults to None.
        slot_weights (Tensor, optional): ``[E, C]`` weight with which each
            slot's output is added to its token (expert choice).
            Defaults to None.
    """

    def __init__(self,
                 slot_token: Tensor,
                 num_tokens: int,
                 slot_pair: Optional[Tensor] = None,
                 slot_index: Optional[Tensor] = None,
                 kept: Optional[Tensor] = None,
                 combine_weights: Optional[Tensor] = None,
                 slot_weights: Optional[Tensor] = None):
        assert (slot_pair is None) != (slot_weights is None)
        self.slot_token = slot_token
        self.num_tokens = num_tokens
        self.slot_pair = slot_pair
        self.slot_index = slot_index
        self.kept = kept
        self.combine_weights = combine_weights
        self.slot_weights = slot_weights

    @property
    def num_experts(self) -> int:
        return self.slot_token.shape[0]

    def dispatch(self, x: Tensor) -> Tensor:
        """Copy tokens into the expert buffer.

        Args:
            x (Tensor): ``[N, D]`` tokens.

        Returns:
            Tensor: ``[E, C, D]`` expert inputs (zeros in empty slots).
        """
        num_experts, slots = self.slot_token.shape
        flat = self.slot_token.reshape(-1)
        if self.slot_pair is None:
            buffer = x.index_select(0, flat)
        else:
            buffer = _DispatchTokens.apply(x, flat, self.slot_index,
                                           self.kept)
        return buffer.view(num_experts, slots, x.shape[-1])

    def combine(self, y: Tensor) -> Tensor:
        """Weighted sum of each token's expert outputs.

        Args:
            y (Tensor): ``[E, C, D]`` expert outputs.

        Returns:
            Tensor: ``[N, D]``; 0 for a token whose choices were all dropped.
        """
        flat = y.reshape(-1, y.shape[-1])
        if self.slot_pair is not None:
            return _CombineSlots.apply(flat, self.combine_weights,
                                       self.slot_index,
                                       self.slot_token.reshape(-1),
                                       self.slot_pair.reshape(-1))
        weighted = flat * self.slot_weights.reshape(-1, 1).to(y.dtype)
        out = y.new_zeros(self.num_tokens, y.shape[-1])
        return out.index_add(0, self.slot_token.reshape(-1), weighted)


def token_choice_dispatcher(expert_index: Tensor, slot: Tensor, kept: Tensor,
                            weights: Tensor, capacity: int,
                            num_experts: int) -> IndexDispatcher:
    """Build the dispatcher of a token-choice routing.

    Slot ``(e, g, b)`` of the buffer is flat index ``e * G * B + g * B + b``,
    so the buffer reads as ``[E, G * B, D]``: for each expert, the slots of
    every group one after the other.

    Args:
        expert_index (Tensor): ``[G, S, K]`` chosen experts.
        slot (Tensor): ``[G, S, K]`` position in the chosen expert's buffer.
        kept (Tensor): ``[G, S, K]`` bool, ``slot < capacity``.
        weights (Tensor): ``[G, S, K]`` combine weight of each choice.
        capacity (int): ``B``, slots per expert and group.
        num_experts (int): ``E``.

    Returns:
        IndexDispatcher: with ``C = G * B``.
    """
    groups, group_tokens, top_k = expert_index.shape
    num_tokens = groups * group_tokens
    slots_per_expert = groups * capacity
    group_offset = torch.arange(
        groups, device=slot.device).view(groups, 1, 1) * capacity
    flat_slot = expert_index * slots_per_expert + group_offset + slot
    trash = num_experts * slots_per_expert
    flat_slot = torch.where(kept, flat_slot, torch.full_like(flat_slot, trash))
    pair_ids = torch.arange(num_tokens * top_k, device=slot.device)
    # Kept slots are unique; only the trash entry gets duplicate writes, and
    # it is cut off below. Slots nobody writes keep N * K: empty.
    slot_pair = torch.full((trash + 1, ),
                           num_tokens * top_k,
                           dtype=torch.long,
                           device=slot.device).scatter_(
                               0, flat_slot.reshape(-1), pair_ids)
    slot_pair = slot_pair[:trash].view(num_experts, slots_per_expert)
    slot_index = torch.where(kept, flat_slot, torch.zeros_like(flat_slot))
    return IndexDispatcher(
        torch.div(slot_pair, top_k, rounding_mode='floor'),
        num_tokens,
        slot_pair=slot_pair,
        slot_index=slot_index.reshape(num_tokens, top_k),
        kept=kept.reshape(num_tokens, top_k),
        combine_weights=(weights * kept.to(weights.dtype)).reshape(
            num_tokens, top_k))


def expert_choice_dispatcher(token_index: Tensor, weights: Tensor,
                             group_tokens: int) -> IndexDispatcher:
    """Build the dispatcher of an expert-choice routing.

    Args:
        token_index (Tensor): ``[G, E, B]`` token (within its group of
            ``S`` tokens) that fills each slot.
        weights (Tensor): ``[G, E, B]`` combine weight of each slot.
        group_tokens (int): ``S``, tokens per group.

    Returns:
        IndexDispatcher: with ``C = G * B``.
    """
    groups, num_experts, capacity = token_index.shape
    offset = torch.arange(
        groups, device=token_index.device).view(groups, 1, 1) * group_tokens
    flat = (token_index + offset).transpose(0, 1).reshape(num_experts, -1)
    return IndexDispatcher(
        flat,
        groups * group_tokens,
        slot_weights=weights.transpose(0, 1).reshape(num_experts, -1))
