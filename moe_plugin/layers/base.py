"""What every MoE layer is: the base class and the contract it keeps.

An MoE layer is a drop-in for a transformer block's FFN, ``[B, N, D] ->
[B, N, D]`` without the residual, that leaves the routing metrics of its last
forward in a ``moe_metrics`` dict (routers return data, not losses: the
classifier turns them into losses). :class:`MoELayer` keeps that contract
for the layers of this package and holds what they share: the metrics, the
copy rule for them, and the expert-parallel sharding of their
:class:`~moe_plugin.layers.BatchedExperts` groups. :func:`is_moe_layer` is
the one test for "an MoE layer"; a registered layer of one's own keeps the
contract by setting a ``moe_metrics`` dict, without subclassing.
"""
from typing import Dict, Union

from torch import Tensor, nn

from .expert_parallel import shard_experts
from .experts import BatchedExperts


def is_moe_layer(module: nn.Module) -> bool:
    """Whether ``module`` is an MoE layer: it has a ``moe_metrics`` dict.

    True for every :class:`MoELayer` and for any other module keeping the
    contract (e.g. a user's layer registered for ``moe_cfg``).
    """
    return isinstance(getattr(module, 'moe_metrics', None), dict)


class MoELayer(nn.Module):
    """Base of the MoE layers of :mod:`moe_plugin.layers`.

    Subclasses build their :class:`BatchedExperts` as direct children, call
    :meth:`shard_experts` once their parameters are initialised, and set
    ``self.moe_metrics`` in ``forward``.

    Attributes:
        moe_metrics (dict[str, Tensor]): the routing metrics of the last
            forward pass (``*_loss`` entries, ``expert_load``, ...); empty
            before the first one.
    """

    def __init__(self):
        super().__init__()
        self.moe_metrics: Dict[str, Tensor] = {}

    def __getstate__(self):
        # The metrics of the last forward hold the autograd graph: copies
        # and pickles (EMA, deepcopy) start without them.
        state = super().__getstate__()
        state['moe_metrics'] = {}
        return state

    def expert_groups(self) -> Dict[str, BatchedExperts]:
        """The layer's batched-expert groups by attribute name, in order."""
        return {
            name: module
            for name, module in self.named_children()
            if isinstance(module, BatchedExperts)
        }

    def shard_experts(self, expert_parallel: Union[bool, int, None]) -> None:
        """Keep only this rank's experts of every group (expert parallelism).

        Args:
            expert_parallel (bool | int | None): the layer's setting, see
                :func:`~moe_plugin.layers.expert_parallel.shard_experts`;
                nothing happens when it turns expert parallelism off.
        """
        for experts in self.expert_groups().values():
            shard_experts(experts, expert_parallel)
