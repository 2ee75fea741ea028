"""MoE Jetpack's SpheroMoE: Soft-MoE routing by cosine similarity, with a
core and a universal group of experts (the dual path).

From "MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for
Vision Tasks" (arXiv 2406.04801), to the numerics of its code
(github.com/Adlith/MoE-Jetpack, ``DualPathSoftMoELayerWrapper``):

- keys ``K = x / (|x| + 1e-6)`` (``normalize_keys``); queries
  ``Q = LN_slot(phi) / (|LN_slot(phi)| + 1e-6)`` (``slot_layernorm``; the
  slot LayerNorm has torch's default eps 1e-5) or ``phi / (|phi| + 1e-6)``;
  logits ``S = <K, Q>`` in ``[-1, 1]``, ``[B, N, E, p]``.
- dispatch logits ``S / tau_d``, combine logits ``S / tau_c`` (two learnable
  temperatures, kept positive), plus, in training only, the same Gaussian
  noise of std ``noise_mult`` on both (the original adds it in evaluation
  too; we do not: evaluation is deterministic).
- dispatch = softmax over the N tokens; combine = softmax or entmax-1.5 over
  all ``E * p`` slots; slot inputs mix the raw tokens.
- slots ``[0, E_c * p)`` go to the ``E_c`` core experts (hidden width ``H``),
  the rest to the ``E_u`` universal experts (hidden width
  ``round(H * univ_factor)``).
- optional ``x * gamma + beta`` scales around each expert group
  (``expert_layer_scale``), dropout inside the experts and a per-sample drop
  path on the layer's output.
- ``single_scale=True`` is its single path (``SoftMoELayerWrapper``, the
  Soft MoE baseline): one learnable ``scale`` (init 1) multiplies the
  queries, dispatch and combine share the logits; with its slot LayerNorm
  the keys are not normalised and the queries get no ℓ2
  (``normalize_keys=False, normalize_queries=False``).

Parameters and their MoE Jetpack names: ``phi`` ``[E, p, D]`` (``phi``),
``slot_norm`` (``slot_norm``), ``scales.0``/``scales.1`` (``scales.0``,
``scales.1``: dispatch and combine temperatures), ``core_experts`` /
``univ_experts`` (:class:`BatchedExperts`; MoE Jetpack's
``core_experts.vit_fc1.weight`` ``[E, H, D]`` is the transpose of ``w1``).
"""
from typing import Optional, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from .base import MoELayer
from .entmax import entmax15
from .experts import BatchedExperts
from .soft_moe import expert_share, slots_to_tokens, tokens_to_slots

COMBINES = ('softmax', 'entmax15')


def cosine_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / (|x| + eps)`` over the last dim (MoE Jetpack's ``l2norm``)."""
    return x / (x.norm(dim=-1, keepdim=True) + eps)


class OffsetScale(nn.Module):
    """``x * gamma + beta`` over the last dim (gamma 1, beta 0 at init)."""

    def __init__(self, dims: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dims))
        self.beta = nn.Parameter(torch.zeros(dims))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma + self.beta


class SpheroMoE(MoELayer):
    """MoE Jetpack's dual-path SpheroMoE layer, a drop-in for a ViT MLP.

    A paper implementation of `MoE Jetpack <https://arxiv.org/abs/2406.
    04801>`_. With ``num_universal_experts=0`` it is the single-path layer.
    The layer adds no residual: the block around it does.

    Args:
        embed_dims (int): Token width ``D``.
        feedforward_channels (int): Hidden width ``H`` of a core expert.
        num_experts (int): Core experts ``E_c``.
        num_universal_experts (int): Universal experts ``E_u``; 0 for the
            single path. Defaults to 0.
        univ_factor (float): Universal hidden width is
            ``round(H * univ_factor)``. Defaults to 0.25.
        slots_per_expert (int): ``p``. Defaults to 1.
        normalize_keys (bool): ℓ2-normalise the tokens (MoE Jetpack's code
            does; its paper says it does not). Defaults to True.
        slot_layernorm (bool): LayerNorm on the slot parameters before their
            ℓ2 normalisation. Defaults to True.
        combine (str): 'softmax' or 'entmax15' (MoE Jetpack's; our exact
            sort-free :func:`~moe_plugin.layers.entmax.entmax15`, equal to
            the ``entmax`` package's). Defaults to 'softmax'.
        temperature_init (float): Initial dispatch and combine temperature
            (MoE Jetpack: 0.5). Defaults to 0.5.
        min_temperature (float): Temperatures are clamped to at least this.
            Defaults to 1e-3.
        noise_mult (float, optional): Std of the training noise on the
            logits; None for ``1 / (E_c + E_u)``. Defaults to None.
        expert_drop (float): Dropout inside each expert (MoE Jetpack's
            ``moe_droprate``). Defaults to 0.
        drop_path_rate (float): Per-sample drop path on the layer's output
            (``moe_drop_path_rate``). Defaults to 0.
        expert_layer_scale (bool): ``x * gamma + beta`` before and after each
            expert group. Defaults to False.
        act (str): 'gelu' (MoE Jetpack) or 'gelu_tanh'. Defaults to 'gelu'.
        normalize_queries (bool): ℓ2-normalise the queries (after the slot
            LayerNorm). Defaults to True.
        single_scale (bool): one ``scale`` (init 1) multiplying the queries
            instead of the two temperatures dividing the logits (MoE
            Jetpack's single path). Defaults to False.
        expert_parallel (bool | int): Hold ``E_c / P`` core and ``E_u / P``
            universal experts per rank and exchange each group's slots with
            ``all_to_all`` (see :class:`~moe_plugin.layers.SparseMoE`).
            Defaults to False.
    """

    def __init__(self,
                 embed_dims: int,
                 feedforward_channels: int,
                 num_experts: int,
                 num_universal_experts: int = 0,
                 univ_factor: float = 0.25,
                 slots_per_expert: int = 1,
                 normalize_keys: bool = True,
                 slot_layernorm: bool = True,
                 combine: str = 'softmax',
                 temperature_init: float = 0.5,
                 min_temperature: float = 1e-3,
                 noise_mult: Optional[float] = None,
                 expert_drop: float = 0.0,
                 drop_path_rate: float = 0.0,
                 expert_layer_scale: bool = False,
                 act: str = 'gelu',
                 normalize_queries: bool = True,
                 single_scale: bool = False,
                 expert_parallel: Union[bool, int] = False):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f'num_experts must be >= 1, got {num_experts}')
        if num_universal_experts < 0:
            raise ValueError(f'num_universal_experts must be >= 0, got '
                             f'{num_universal_experts}')
        if (isinstance(slots_per_expert, bool)
                or int(slots_per_expert) != slots_per_expert
                or slots_per_expert < 1):
            raise ValueError(f'slots_per_expert must be an integer >= 1, got '
                             f'{slots_per_expert!r}')
        if combine not in COMBINES:
            raise ValueError(
                f'combine must be one of {COMBINES}, got {combine!r}')
        if not temperature_init > 0 or not min_temperature > 0:
            raise ValueError(
                f'temperature_init and min_temperature must be > 0, got '
                f'{temperature_init} and {min_temperature}')
        if noise_mult is not None and noise_mult < 0:
            raise ValueError(f'noise_mult must be >= 0, got {noise_mult}')
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(
                f'drop_path_rate must be in [0, 1), got {drop_path_rate}')
        univ_hidden = int(round(feedforward_channels * univ_factor))
        if num_universal_experts and univ_hidden < 1:
            raise ValueError(
                f'univ_factor={univ_factor} gives universal experts a hidden '
                f'width of {univ_hidden} (feedforward_channels='
                f'{feedforward_channels}); it must be >= 1')
        total = num_experts + num_universal_experts
        self.num_core_experts = num_experts
        self.num_universal_experts = num_universal_experts
        self.num_experts = total
        self.slots_per_expert = int(slots_per_expert)
        self.normalize_keys = normalize_keys
        self.normalize_queries = normalize_queries
        self.combine = combine
        self.min_temperature = min_temperature
        self.noise_mult = 1.0 / total if noise_mult is None else noise_mult

        self.phi = nn.Parameter(
            torch.empty(total, self.slots_per_expert, embed_dims))
        self.slot_norm = (
            nn.LayerNorm(embed_dims) if slot_layernorm else nn.Identity())
        if single_scale:
            self.scale = nn.Parameter(torch.tensor(1.0))
            self.scales = None
        else:
            self.scales = nn.ParameterList([
                nn.Parameter(torch.tensor(float(temperature_init))),
                nn.Parameter(torch.tensor(float(temperature_init)))
            ])
        self.core_experts = BatchedExperts(num_experts, embed_dims,
                                           feedforward_channels, act,
                                           expert_drop)
        self.univ_experts = (
            BatchedExperts(num_universal_experts, embed_dims, univ_hidden,
                           act, expert_drop)
            if num_universal_experts else None)
        groups = 2 if num_universal_experts else 1
        self.scale_in = nn.ModuleList(
            OffsetScale(embed_dims)
            for _ in range(groups)) if expert_layer_scale else None
        self.scale_out = nn.ModuleList(
            OffsetScale(embed_dims)
            for _ in range(groups)) if expert_layer_scale else None
        self.drop_path = (
            DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity())
        self.reset_parameters()
        self.shard_experts(expert_parallel)

    def reset_parameters(self):
        """Orthogonal slot parameters over the flattened ``[E * p, D]``."""
        nn.init.orthogonal_(self.phi.view(-1, self.phi.shape[-1]))

    def temperatures(self):
        """Dispatch and combine temperatures, clamped to be positive."""
        if self.scales is None:
            raise AttributeError('a single_scale SpheroMoE has one `scale` '
                                 'multiplying the queries, no temperatures')
        return (self.scales[0].clamp(min=self.min_temperature),
                self.scales[1].clamp(min=self.min_temperature))

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
            keys = x.to(dtype)
            if self.normalize_keys:
                keys = cosine_normalize(keys)
            queries = self.phi.to(dtype)
            if isinstance(self.slot_norm, nn.LayerNorm):
                norm = self.slot_norm
                queries = F.layer_norm(queries, norm.normalized_shape,
                                       norm.weight.to(dtype),
                                       norm.bias.to(dtype), norm.eps)
            if self.normalize_queries:
                queries = cosine_normalize(queries)
            if self.scales is None:
                queries = queries * self.scale.to(dtype)
            logits = torch.einsum('bnd,epd->bnep', keys, queries)
            if self.scales is None:
                dispatch_logits = combine_logits = logits
            else:
                dispatch_temp, combine_temp = self.temperatures()
                dispatch_logits = logits / dispatch_temp.to(dtype)
                combine_logits = logits / combine_temp.to(dtype)
            if self.training and self.noise_mult > 0:
                noise = torch.randn_like(logits) * self.noise_mult
                dispatch_logits = dispatch_logits + noise
                combine_logits = combine_logits + noise
            dispatch = dispatch_logits.softmax(1)
            combine_logits = combine_logits.flatten(2)
            if self.combine == 'entmax15':
                combine = entmax15(combine_logits, dim=-1)
            else:
                combine = combine_logits.softmax(-1)
        return dispatch, combine

    def _run_group(self, experts: BatchedExperts, slots: Tensor,
                   group: int) -> Tensor:
        """One expert group on its slots ``[E_g, C, D]``."""
        if self.scale_in is not None:
            slots = self.scale_in[group](slots)
        out = experts(slots)
        if self.scale_out is not None:
            out = self.scale_out[group](out)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Mix tokens into slots, run both expert groups, mix back.

        Args:
            x (Tensor): ``[B, N, D]`` tokens.

        Returns:
            Tensor: ``[B, N, D]``; sets ``self.moe_metrics`` (``expert_load``:
            ``[E_c + E_u]``, each expert's share of the combine weight).
        """
        dispatch, combine = self.routing_weights(x)
        slots = tokens_to_slots(dispatch, x)
        core = self.num_core_experts
        out = self._run_group(self.core_experts, slots[:core], 0)
        if self.univ_experts is not None:
            out = torch.cat(
                [out, self._run_group(self.univ_experts, slots[core:], 1)])
        y = self.drop_path(slots_to_tokens(combine, out, x.shape[0]))
        self.moe_metrics = {
            'expert_load': expert_share(combine, self.num_experts)
        }
        return y

    def extra_repr(self) -> str:
        return (f'core={self.num_core_experts}, '
                f'universal={self.num_universal_experts}, '
                f'slots_per_expert={self.slots_per_expert}, '
                f'combine={self.combine!r}, noise_mult={self.noise_mult:.4g}'
                + (', single_scale=True' if self.scales is None else ''))
