"""The V-MoE layer: router + static index dispatch + batched experts."""
import numbers
from typing import Dict, Optional, Tuple, Union

from torch import Tensor, nn

from .base import MoELayer
from .dispatch import IndexDispatcher
from .experts import BatchedExperts
from .routing import (Dropless, NoisyTopExpertsPerItem, NoisyTopItemsPerExpert,
                      compute_capacity)

ROUTERS = ('token_choice', 'expert_choice')
CAPACITY_ROUNDINGS = ('ceil', 'round')


def _check_group_size(name: str, value) -> None:
    """A group size is a whole number of images >= 1, or None."""
    if value is None:
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or value < 1):
        raise ValueError(f'{name} must be >= 1 or None, got {value!r}')


class SparseMoE(MoELayer):
    """Sparse Mixture of MLP experts, a drop-in for a ViT block's MLP.

    From "Scaling Vision with Sparse Mixture of Experts" (V-MoE,
    https://arxiv.org/abs/2106.05974). Tokens are split in groups; in each
    group a router sends every token to its top-K experts (or every expert
    takes its top-B tokens), each expert processes at most B tokens, and a
    token's output is the gate-weighted sum of its experts' outputs. The
    layer adds no residual: the block around it does.

    Routing, capacity and batch priority are configuration, not weights:
    ``eval_*`` values apply in evaluation mode (V-MoE trains S/32 with
    ``capacity_factor=1.05`` and evaluates with 4.0).

    Args:
        embed_dims (int): ``D``.
        feedforward_channels (int): hidden width ``H`` of each expert.
        num_experts (int): ``E``. Defaults to 8.
        top_k (int): experts per token ``K`` (token choice). Defaults to 2.
        capacity_factor (float, optional): ``c`` in
            ``B = ceil(S * K * c / E)``. Defaults to 1.05.
        capacity (int, optional): explicit ``B`` instead of
            ``capacity_factor``. Defaults to None.
        capacity_multiple_of (int): ``B`` is rounded up to a multiple of
            this. Defaults to 4.
        capacity_rounding (str): 'ceil' or 'round' (half to even).
            Defaults to 'ceil'.
        batch_priority (bool): Batch Priority Routing. Defaults to False.
        renormalize (bool): renormalise the top-K combine weights to sum to
            1. Defaults to False (V-MoE).
        noise_std (float): router noise std is ``noise_std / E`` (training
            only). Defaults to 1.0.
        group_size (int, optional): images per routing group in training;
            None makes each image its own group. Defaults to None.
        router (str): 'token_choice' or 'expert_choice'.
            Defaults to 'token_choice'.
        expert_drop (float): dropout inside each expert. Defaults to 0.
        act (str): 'gelu_tanh' or 'gelu'. Defaults to 'gelu_tanh'.
        eval_top_k (int, optional): ``K`` in evaluation. Defaults to None
            (same as training).
        eval_capacity_factor (float, optional): ``c`` in evaluation.
            Defaults to None (same as training).
        eval_batch_priority (bool, optional): BPR in evaluation. Defaults to
            None (same as training).
        eval_group_size (int, optional): images per group in evaluation.
            Defaults to None (each image its own group: batch independent).
        expert_parallel (bool | int): hold ``E / P`` experts per rank and
            exchange the expert buffer with ``all_to_all``: True for ``P``
            = all ranks, an int ``P`` dividing the world size, False for
            every expert on every rank. Ignored without an initialised
            process group. See :mod:`moe_plugin.layers.expert_parallel`.
            Defaults to False.
        dropless (bool): token choice only: drop nothing; the capacity is
            the largest expert load of the batch's groups, rounded up to
            ``capacity_multiple_of`` (Tutel's ``capacity_factor=0``,
            MegaBlocks' dMoE), in training and evaluation. It costs one
            device-to-host synchronisation per layer and forward, gives
            data-dependent shapes (``torch.compile`` breaks the graph there,
            or with ``fullgraph=True`` traces an unbacked capacity) and,
            under expert parallelism, a max all-reduce over the EP group
            so that its ranks agree on the capacity. See
            :class:`~moe_plugin.layers.routing.Dropless`. Defaults to False.
        bias_balancing (bool): token choice only: auxiliary-loss-free load
            balancing (arXiv 2408.15664), a per-expert selection bias
            updated by every training forward; the auxiliary losses can
            then be weighted 0. See
            :class:`~moe_plugin.layers.NoisyTopExpertsPerItem`. Defaults to
            False.
        bias_update_rate (float): the bias's step ``u``. Defaults to 1e-3.
        gate (str): 'linear' (V-MoE) or 'cosine' (Swin-MoE's cosine
            router). Defaults to 'linear'.
        gate_dim (int): the cosine gate's projection width. Defaults to 256.
        init_temperature (float): the cosine gate's initial temperature.
            Defaults to 0.07.
        jitter (float): Switch's multiplicative jitter ``eps`` on the
            router's input in training. Defaults to 0 (off).
    """

    def __init__(self,
                 embed_dims: int,
                 feedforward_channels: int,
                 num_experts: int = 8,
                 top_k: int = 2,
                 capacity_factor: Optional[float] = 1.05,
                 capacity: Optional[int] = None,
                 capacity_multiple_of: int = 4,
                 capacity_rounding: str = 'ceil',
                 batch_priority: bool = False,
                 renormalize: bool = False,
                 noise_std: float = 1.0,
                 group_size: Optional[int] = None,
                 router: str = 'token_choice',
                 expert_drop: float = 0.0,
                 act: str = 'gelu_tanh',
                 eval_top_k: Optional[int] = None,
                 eval_capacity_factor: Optional[float] = None,
                 eval_batch_priority: Optional[bool] = None,
                 eval_group_size: Optional[int] = None,
                 expert_parallel: Union[bool, int] = False,
                 dropless: bool = False,
                 bias_balancing: bool = False,
                 bias_update_rate: float = 1e-3,
                 gate: str = 'linear',
                 gate_dim: int = 256,
                 init_temperature: float = 0.07,
                 jitter: float = 0.0):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(
                f'router must be one of {ROUTERS}, got {router!r}')
        for name, value in (('dropless', dropless),
                            ('bias_balancing', bias_balancing)):
            if not isinstance(value, bool):
                raise ValueError(f'{name} must be True or False, got '
                                 f'{value!r}')
            if value and router != 'token_choice':
                raise ValueError(
                    f'{name}=True needs router=\'token_choice\' (expert '
                    f'choice drops no expert slot and balances by '
                    f'construction), got router={router!r}')
        if num_experts < 1:
            raise ValueError(f'num_experts must be >= 1, got {num_experts}')
        if capacity is not None:
            # An explicit capacity replaces the default capacity factor.
            capacity_factor = None
        self.num_experts = num_experts
        self.router_type = router
        self.capacity = capacity
        self.capacity_multiple_of = capacity_multiple_of
        self.capacity_rounding = capacity_rounding
        self.renormalize = renormalize
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.batch_priority = batch_priority
        self.group_size = group_size
        self.eval_top_k = top_k if eval_top_k is None else eval_top_k
        self.eval_capacity_factor = (
            capacity_factor
            if eval_capacity_factor is None else eval_capacity_factor)
        self.eval_batch_priority = (
            batch_priority
            if eval_batch_priority is None else eval_batch_priority)
        self.eval_group_size = eval_group_size
        self.dropless = dropless
        for name in ('top_k', 'eval_top_k'):
            self._check_top_k(name, getattr(self, name))
        for name in ('group_size', 'eval_group_size'):
            _check_group_size(name, getattr(self, name))
        if capacity_rounding not in CAPACITY_ROUNDINGS:
            raise ValueError(
                f'capacity_rounding must be one of {CAPACITY_ROUNDINGS}, '
                f'got {capacity_rounding!r}')
        for factor in (self.capacity_factor, self.eval_capacity_factor):
            # Validates the factor, the explicit capacity and the rounding.
            compute_capacity(1, num_experts, 1, factor,
                             None if factor is not None else capacity,
                             capacity_multiple_of, capacity_rounding)
        gate_options = dict(gate=gate, gate_dim=gate_dim,
                            init_temperature=init_temperature, jitter=jitter)
        if router == 'token_choice':
            self.router = NoisyTopExpertsPerItem(
                embed_dims, num_experts, noise_std, bias_balancing,
                bias_update_rate, **gate_options)
        else:
            self.router = NoisyTopItemsPerExpert(embed_dims, num_experts,
                                                 noise_std, **gate_options)
        self.experts = BatchedExperts(num_experts, embed_dims,
                                      feedforward_channels, act, expert_drop)
        self.shard_experts(expert_parallel)

    def _check_top_k(self, name: str, value: int):
        if not 1 <= value <= self.num_experts:
            raise ValueError(f'{name} must be in [1, num_experts='
                             f'{self.num_experts}], got {value}')

    def routing_options(self) -> dict:
        """The routing options in force (training or evaluation mode)."""
        if self.training:
            return dict(
                top_k=self.top_k,
                capacity_factor=self.capacity_factor,
                batch_priority=self.batch_priority,
                group_size=self.group_size)
        return dict(
            top_k=self.eval_top_k,
            capacity_factor=self.eval_capacity_factor,
            batch_priority=self.eval_batch_priority,
            group_size=self.eval_group_size)

    def group(self, x: Tensor, group_size: Optional[int]) -> Tensor:
        """``[B, N, D] -> [G, S, D]`` with ``S = group_size * N``."""
        images, tokens, dims = x.shape
        if group_size is None:
            return x
        if images % group_size:
            raise ValueError(
                f'group_size={group_size} images does not divide the batch '
                f'of {images} images ({images * tokens} tokens in groups of '
                f'{group_size * tokens}); use drop_last=True or another '
                'group_size')
        return x.reshape(images // group_size, group_size * tokens, dims)

    def capacity_for(self, group_tokens: int) -> Optional[int]:
        """The capacity ``B`` in force for groups of ``S`` tokens.

        Uses the options of the current mode (training, or evaluation with
        any :func:`set_eval_routing` change); expert choice counts ``K = 1``
        and takes at most ``S`` tokens per expert.

        Args:
            group_tokens (int): ``S``, tokens per routing group.

        Returns:
            int | None: slots per expert and group; None for ``dropless``,
            whose capacity depends on the routing of each batch.
        """
        if self.dropless:
            return None
        options = self.routing_options()
        token_choice = self.router_type == 'token_choice'
        capacity = compute_capacity(
            group_tokens, self.num_experts,
            options['top_k'] if token_choice else 1,
            options['capacity_factor'],
            self.capacity if options['capacity_factor'] is None else None,
            self.capacity_multiple_of, self.capacity_rounding)
        return capacity if token_choice else min(capacity, group_tokens)

    def router_arguments(self, group_tokens: int) -> dict:
        """The router's keyword arguments for groups of ``S`` tokens.

        Args:
            group_tokens (int): ``S``.

        Returns:
            dict: ``capacity`` (:meth:`capacity_for`, or a
            :class:`~moe_plugin.layers.routing.Dropless` for ``dropless``),
            and for token choice ``top_k``, ``batch_priority`` and
            ``renormalize``, as the current mode has them.
        """
        capacity = self.capacity_for(group_tokens)
        if capacity is None:
            shard = getattr(self.experts, 'expert_shard', None)
            capacity = Dropless(self.capacity_multiple_of,
                                None if shard is None else shard.group)
        arguments = dict(capacity=capacity)
        if self.router_type == 'token_choice':
            options = self.routing_options()
            arguments.update(
                top_k=options['top_k'],
                batch_priority=options['batch_priority'],
                renormalize=self.renormalize)
        return arguments

    def route(self, groups: Tensor
              ) -> Tuple[IndexDispatcher, Dict[str, Tensor]]:
        """Route grouped tokens with the options in force.

        Args:
            groups (Tensor): ``[G, S, D]`` tokens (see :meth:`group`).

        Returns:
            tuple: the router's dispatcher and metrics.
        """
        return self.router(groups, **self.router_arguments(groups.shape[1]))

    def forward(self, x: Tensor) -> Tensor:
        """Route, run the experts and combine.

        Args:
            x (Tensor): ``[B, N, D]`` tokens.

        Returns:
            Tensor: ``[B, N, D]``; sets ``self.moe_metrics``.
        """
        groups = self.group(x, self.routing_options()['group_size'])
        dispatcher, metrics = self.route(groups)
        flat = groups.reshape(-1, groups.shape[-1])
        out = dispatcher.combine(self.experts(dispatcher.dispatch(flat)))
        self.moe_metrics = metrics
        return out.view_as(x)

    def extra_repr(self) -> str:
        return (f'router={self.router_type}, num_experts={self.num_experts}, '
                f'top_k={self.top_k}, capacity_factor={self.capacity_factor}, '
                f'capacity={self.capacity}, '
                f'batch_priority={self.batch_priority}, '
                f'group_size={self.group_size}, eval_top_k={self.eval_top_k}, '
                f'eval_capacity_factor={self.eval_capacity_factor}, '
                f'eval_batch_priority={self.eval_batch_priority}, '
                f'eval_group_size={self.eval_group_size}, '
                f'dropless={self.dropless}')


def set_eval_routing(model: nn.Module, **options) -> int:
    """Change the evaluation-time routing of every MoE layer in a model.

    Args:
        model (nn.Module): any model.
        **options: any of ``top_k``, ``capacity_factor``,
            ``batch_priority``, ``group_size``; an option left out or None
            keeps the layer's value, except ``group_size`` where None means
            "each image its own group".

    Returns:
        int: how many layers were changed.
    """
    valid = ('top_k', 'capacity_factor', 'batch_priority', 'group_size')
    unknown = set(options) - set(valid)
    if unknown:
        raise ValueError(f'unknown eval routing options {sorted(unknown)}; '
                         f'valid: {valid}')
    layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
    # Validate everything first so that a bad value changes no layer.
    for module in layers:
        if options.get('top_k') is not None:
            module._check_top_k('eval_top_k', options['top_k'])
        if options.get('capacity_factor') is not None:
            compute_capacity(1, module.num_experts, 1,
                             options['capacity_factor'], None,
                             module.capacity_multiple_of,
                             module.capacity_rounding)
    if 'group_size' in options:
        _check_group_size('group_size', options['group_size'])
    for module in layers:
        if options.get('top_k') is not None:
            module.eval_top_k = options['top_k']
        if options.get('capacity_factor') is not None:
            module.eval_capacity_factor = options['capacity_factor']
        if options.get('batch_priority') is not None:
            module.eval_batch_priority = bool(options['batch_priority'])
        if 'group_size' in options:
            module.eval_group_size = options['group_size']
    return len(layers)
