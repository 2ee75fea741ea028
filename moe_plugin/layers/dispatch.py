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


class IndexDispatcher:
    """Moves tokens between ``[N, D]`` and the expert buffer ``[E, C, D]``.

    Exactly one of ``slot_index`` (token choice: each token reads ``K``
    slots) and ``slot_weights`` (expert choice: each slot writes back to its
    token) is given.

    Args:
        token_index (Tensor): ``[E, C]`` long, the flat token (in ``[0, N)``)
            copied into each slot. Empty slots hold any valid index; their
            output is never read back.
        num_tokens (int): ``N``, the number of tokens over all groups.
        slot_index (Tensor, optional): ``[N, K]`` long, the flat slot (in
            ``[0, E * C)``) each (token, choice) reads its output from.
            Dropped choices point at any valid slot with weight 0.
            Defaults to None.
        combine_weights (Tensor, optional): ``[N, K]`` weight of each
            (token, choice); 0 for dropped choices. Defaults to None.
        slot_weights (Tensor, optional): ``[E, C]`` weight with which each
            slot's output is added to its token; 0 for empty slots.
            Defaults to None.
    """

    def __init__(self,
                 token_index: Tensor,
                 num_tokens: int,
                 slot_index: Optional[Tensor] = None,
                 combine_weights: Optional[Tensor] = None,
                 slot_weights: Optional[Tensor] = None):
        assert (slot_index is None) == (combine_weights is None)
        assert (slot_index is None) != (slot_weights is None)
        self.token_index = token_index
        self.num_tokens = num_tokens
        self.slot_index = slot_index
        self.combine_weights = combine_weights
        self.slot_weights = slot_weights

    @property
    def num_experts(self) -> int:
        return self.token_index.shape[0]

    def dispatch(self, x: Tensor) -> Tensor:
        """Copy tokens into the expert buffer.

        Args:
            x (Tensor): ``[N, D]`` tokens.

        Returns:
            Tensor: ``[E, C, D]`` expert inputs.
        """
        num_experts, slots = self.token_index.shape
        return x.index_select(0, self.token_index.reshape(-1)).view(
            num_experts, slots, x.shape[-1])

    def combine(self, y: Tensor) -> Tensor:
        """Weighted sum of each token's expert outputs.

        Args:
            y (Tensor): ``[E, C, D]`` expert outputs.

        Returns:
            Tensor: ``[N, D]``; 0 for a token whose choices were all dropped.
        """
        dim = y.shape[-1]
        flat = y.reshape(-1, dim)
        if self.slot_index is not None:
            num_choices = self.slot_index.shape[1]
            gathered = flat.index_select(0, self.slot_index.reshape(-1))
            gathered = gathered.view(self.num_tokens, num_choices, dim)
            weights = self.combine_weights.to(y.dtype)
            if num_choices == 1:
                return gathered[:, 0] * weights
            return torch.bmm(weights.unsqueeze(1), gathered).squeeze(1)
        weighted = flat * self.slot_weights.reshape(-1, 1).to(y.dtype)
        out = y.new_zeros(self.num_tokens, dim)
        return out.index_add(0, self.token_index.reshape(-1), weighted)


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
    slots_per_expert = groups * capacity
    group_offset = torch.arange(
        groups, device=slot.device).view(groups, 1, 1) * capacity
    flat_slot = expert_index * slots_per_expert + group_offset + slot
    trash = num_experts * slots_per_expert
    flat_slot = torch.where(kept, flat_slot, torch.full_like(flat_slot, trash))
    num_tokens = groups * group_tokens
    token_ids = torch.arange(num_tokens, device=slot.device)
    token_ids = token_ids.view(groups, group_tokens, 1).expand_as(flat_slot)
    # Kept slots are unique; only the trash row gets duplicate writes, and it
    # is cut off below.
    token_index = torch.zeros(
        trash + 1, dtype=torch.long, device=slot.device).scatter_(
            0, flat_slot.reshape(-1), token_ids.reshape(-1))
    token_index = token_index[:trash].view(num_experts, slots_per_expert)
    slot_index = torch.where(kept, flat_slot, torch.zeros_like(flat_slot))
    combine_weights = weights * kept.to(weights.dtype)
    return IndexDispatcher(
        token_index,
        num_tokens,
        slot_index=slot_index.reshape(num_tokens, top_k),
        combine_weights=combine_weights.reshape(num_tokens, top_k))


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
