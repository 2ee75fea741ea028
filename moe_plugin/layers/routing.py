"""V-MoE routers: token-choice top-K with capacity and Batch Priority Routing,
expert choice, and the auxiliary balancing losses.

Follows google-research/vmoe ``vmoe/nn/routing.py`` (arXiv 2106.05974) to the
equation, in float32. Routers return data, not losses: a dispatcher and a
metrics dict; whoever trains the model decides what to add to the loss.

Options beyond V-MoE, all off by default: dropless routing (:class:`Dropless`,
Tutel's ``capacity_factor=0`` / MegaBlocks' dMoE), auxiliary-loss-free
balancing by a per-expert selection bias (arXiv 2408.15664), the cosine gate
of Swin-MoE / Tutel's ``cosine_top`` (arXiv 2111.09883, 2206.03382) and
Switch's multiplicative input jitter (arXiv 2101.03961).

Shapes: ``G`` groups of ``S`` tokens of width ``D``; ``E`` experts; each
token chooses ``K`` of them; ``B`` slots per expert and group.
"""
import math
import numbers
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import (IndexDispatcher, expert_choice_dispatcher,
                       token_choice_dispatcher)


def compute_capacity(group_tokens: int,
                     num_experts: int,
                     top_k: int = 1,
                     capacity_factor: Optional[float] = None,
                     capacity: Optional[int] = None,
                     multiple_of: int = 4,
                     rounding: str = 'ceil') -> int:
    """Slots per expert and group.

    ``B = ceil(S * K * c / E)`` (or Python's half-to-even ``round``), then
    rounded up to a multiple of ``multiple_of``. An explicit ``capacity``
    replaces the formula (it is still rounded up to the multiple).

    Args:
        group_tokens (int): ``S``.
        num_experts (int): ``E``.
        top_k (int): ``K`` (1 for expert choice). Defaults to 1.
        capacity_factor (float, optional): ``c``. Defaults to None.
        capacity (int, optional): explicit ``B``. Defaults to None.
        multiple_of (int): Defaults to 4. 1 or 0 disables the rounding.
        rounding (str): 'ceil' or 'round'. Defaults to 'ceil'.

    Returns:
        int: the capacity ``B``.
    """
    if (capacity is None) == (capacity_factor is None):
        raise ValueError('give exactly one of capacity_factor and capacity, '
                         f'got capacity_factor={capacity_factor}, '
                         f'capacity={capacity}')
    if capacity is None:
        if capacity_factor <= 0:
            raise ValueError(
                f'capacity_factor must be > 0, got {capacity_factor}')
        raw = group_tokens * top_k * capacity_factor / num_experts
        if rounding == 'ceil':
            capacity = int(math.ceil(raw))
        elif rounding == 'round':
            capacity = int(round(raw))
        else:
            raise ValueError(
                "capacity_rounding must be 'ceil' or 'round', "
                f'got {rounding!r}')
    if multiple_of and multiple_of > 1:
        capacity += (-capacity) % multiple_of
    if capacity <= 0:
        raise ValueError(
            f'capacity must be > 0, got {capacity} (S={group_tokens}, '
            f'E={num_experts}, K={top_k}, capacity_factor={capacity_factor})')
    return capacity


def stable_topk(x: Tensor, k: int, dim: int = -1) -> Tuple[Tensor, Tensor]:
    """``torch.topk`` (largest first) whose exact ties go to the lower index.

    jax's ``lax.top_k``, which vmoe uses, returns equal values in increasing
    index order; ``torch.topk`` promises no order among them (CPU and CUDA
    differ). Ties are common with a freshly zero router (all gates ``1/E``),
    in bfloat16 and between identical tokens, and at an expert's capacity
    boundary they decide which tokens it takes.

    Floats of at most 32 bits are ranked by an integer key, one ``topk`` over
    unique keys: ``key = b * n + (n - 1 - i)`` where ``b`` is the float32
    value's bit pattern as an int32 made monotone (negative values have their
    31 low bits flipped; ``x + 0.0`` first turns ``-0.0`` into ``+0.0``), ``i``
    the index and ``n`` the length of ``dim``. ``b`` is strictly increasing in
    the value, so ``a > a'`` gives ``b >= b' + 1`` and ``key - key' >=
    n - (n - 1) > 0``: the key order is the value order wherever values
    differ, and among equal values it is the reverse index order, so the
    lower index comes first. ``|key| < 2^31 * n`` fits in int64. Float64 (no
    room for the index) uses a stable descending sort instead, whose
    preservation of the order of equal elements ``torch.sort`` documents on
    every device.

    Args:
        x (Tensor): float scores.
        k (int): how many to take.
        dim (int): the dimension to rank along. Defaults to -1.

    Returns:
        tuple: ``(values, indices)``, as ``torch.topk(x, k, dim)``.
    """
    if x.dtype == torch.float64:
        values, indices = torch.sort(x, dim=dim, descending=True, stable=True)
        return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)
    length = x.shape[dim]
    bits = (x.float() + 0.0).view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    shape = [1] * x.dim()
    shape[dim] = length
    reverse_index = torch.arange(
        length - 1, -1, -1, device=x.device).view(shape)
    indices = (bits * length + reverse_index).topk(k, dim=dim).indices
    return x.gather(dim, indices), indices


class Dropless(NamedTuple):
    """Dropless routing's capacity: the largest expert load, rounded up.

    Given instead of an ``int`` capacity to :func:`assign_top_k` and the
    token-choice router (Tutel's ``capacity_factor=0``, MegaBlocks' dMoE):
    ``B`` becomes the largest number of (token, choice) pairs any expert
    received in any group of the batch, rounded up to a multiple of
    ``multiple_of`` so that the buffer's shape changes in few steps. No pair
    is dropped.

    Reading the load costs one device-to-host synchronisation per layer and
    forward (``.item()``), and the shapes that follow depend on the data:
    ``torch.compile`` breaks the graph there, and with ``fullgraph=True``
    torch 2.14 traces the capacity as an unbacked integer (the sync stays).
    Under expert parallelism every rank of the EP group must send the same
    buffer shape: the load is max-all-reduced over ``group`` first.

    Attributes:
        multiple_of (int): round ``B`` up to a multiple of this; 0 or 1 do
            not round.
        group: the expert-parallel process group, or None.
    """
    multiple_of: int = 4
    group: Optional[object] = None

    def capacity(self, slot: Tensor) -> int:
        """``B`` for slots ``[G, S, K]`` (positions in the experts' buffers).

        Collective over :attr:`group` when it is set.
        """
        needed = (slot.max() + 1).reshape(1) if slot.numel() else \
            slot.new_ones(1)
        if self.group is not None:
            dist.all_reduce(needed, op=dist.ReduceOp.MAX, group=self.group)
        capacity = int(needed.item())
        if self.multiple_of and self.multiple_of > 1:
            capacity += (-capacity) % self.multiple_of
        return capacity


def dispatcher_capacity(dispatcher: IndexDispatcher, groups: int) -> int:
    """The capacity ``B`` a dispatcher of ``G`` groups was built with.

    The dispatcher's buffer has ``C = G * B`` slots per expert; the one way
    to know a dropless routing's ``B`` after the fact.
    """
    return dispatcher.slot_token.shape[1] // groups


class TopKAssignment(NamedTuple):
    """Where each (token, choice) of a token-choice routing goes.

    All fields but ``capacity`` are ``[G, S, K]``.

    Attributes:
        expert_index: chosen expert, best first.
        slot: position in that expert's buffer (choice-major order).
        kept: ``slot < capacity``; False means dropped.
        weights: combine weight (the gate, or the renormalised gate).
        capacity: ``B``, the given one or :class:`Dropless`'s.
    """
    expert_index: Tensor
    slot: Tensor
    kept: Tensor
    weights: Tensor
    capacity: int


def assign_top_k(gates: Tensor,
                 top_k: int,
                 capacity: Union[int, Dropless],
                 batch_priority: bool = False,
                 renormalize: bool = False,
                 selection_bias: Optional[Tensor] = None) -> TopKAssignment:
    """Token-choice top-K assignment with capacity, choice-major slots.

    Every token's 1st choice gets a slot before any token's 2nd choice.
    Inside a choice rank tokens are served in group order, or with Batch
    Priority Routing in descending order of their largest gate (stable).
    Equal gates rank the lower expert index first (:func:`stable_topk`).

    ``renormalize`` divides the K weights of a token by their sum, the
    dropped choices' included; that is Tutel's ``normalize_gate``, whose
    ``eps`` floor on the sum never acts here (the sum of the top-K softmax
    gates is at least ``1 / E``).

    Args:
        gates (Tensor): ``[G, S, E]`` routing probabilities.
        top_k (int): ``K``.
        capacity (int | Dropless): ``B``, or :class:`Dropless` for the
            smallest ``B`` that drops nothing (a host synchronisation).
        batch_priority (bool): Batch Priority Routing. Defaults to False.
        renormalize (bool): divide the K weights by their sum.
            Defaults to False (V-MoE uses the raw gates).
        selection_bias (Tensor, optional): ``[E]`` added to the gates to
            *choose* the experts only (auxiliary-loss-free balancing); the
            weights stay the unbiased gates. Defaults to None.

    Returns:
        TopKAssignment: fields of shape ``[G, S, K]`` and the capacity.
    """
    groups, group_tokens, num_experts = gates.shape
    if selection_bias is None:
        weights, expert_index = stable_topk(gates, top_k, dim=-1)
    else:
        expert_index = stable_topk(gates.detach() + selection_bias, top_k,
                                   dim=-1)[1]
        weights = gates.gather(-1, expert_index)
    if batch_priority:
        # BPR's priority score is the largest gate, the biased choice's or
        # not: weights[..., 0] without a selection bias.
        priority = (weights[..., 0]
                    if selection_bias is None else gates.amax(-1))
        order = torch.sort(
            priority.detach(), dim=1, descending=True, stable=True).indices
        order = order.unsqueeze(-1).expand(-1, -1, top_k)
        served = expert_index.gather(1, order)
    else:
        served = expert_index
    # One-hot counts in choice-major order: [G, K * S, E].
    one_hot = F.one_hot(served, num_experts).transpose(1, 2)
    one_hot = one_hot.reshape(groups, top_k * group_tokens, num_experts)
    slot = (one_hot.cumsum(1) * one_hot).sum(-1) - 1
    slot = slot.view(groups, top_k, group_tokens).transpose(1, 2)
    if batch_priority:
        slot = torch.empty_like(slot).scatter_(1, order, slot)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    if isinstance(capacity, Dropless):
        capacity = capacity.capacity(slot)
    return TopKAssignment(expert_index, slot, slot < capacity, weights,
                          capacity)


def importance_loss(gates: Tensor) -> Tensor:
    """``(std(Imp) / mean(Imp))^2`` with ``Imp_e = sum_s gates[s, e]``.

    Args:
        gates (Tensor): ``[G, S, E]`` (clean) probabilities.

    Returns:
        Tensor: scalar, mean over groups.
    """
    importance = gates.sum(1)
    return _squared_cv(importance).mean()


def load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float,
              top_k: int) -> Tensor:
    """V-MoE's load loss: squared coefficient of variation of the
    probability, under re-drawn noise, that each expert is in a token's top-K.

    Args:
        logits (Tensor): ``[G, S, E]`` clean logits.
        noisy_logits (Tensor): ``[G, S, E]`` logits plus the noise.
        noise_std (float): std of the noise, ``sigma``.
        top_k (int): ``K``.

    Returns:
        Tensor: scalar, mean over groups.
    """
    threshold = noisy_logits.topk(top_k, dim=-1).values[..., -1:]
    prob = 1.0 - torch.special.ndtr((threshold - logits) / noise_std)
    return _squared_cv(prob.mean(1)).mean()


def gshard_loss(gates: Tensor) -> Tensor:
    """GShard's ``E^2 * mean_e(f_e * P_e)``.

    Args:
        gates (Tensor): ``[G, S, E]`` probabilities.

    Returns:
        Tensor: scalar, mean over groups.
    """
    num_experts = gates.shape[-1]
    mean_gates = gates.mean(1)
    top1 = F.one_hot(gates.argmax(-1), num_experts).to(gates.dtype).mean(1)
    return (top1 * mean_gates).mean(-1).mean() * num_experts**2


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's router z-loss ``mean_s logsumexp(l_s)^2``.

    Args:
        logits (Tensor): ``[G, S, E]``.

    Returns:
        Tensor: scalar.
    """
    return logits.logsumexp(-1).square().mean()


def _squared_cv(values: Tensor) -> Tensor:
    """``(std / mean)^2`` over the last dim, population std. ``[..., E]``."""
    return (values.var(-1, unbiased=False) / values.mean(-1).square())


GATES = ('linear', 'cosine')

#: Swin-MoE's clamp of the cosine gate's learnable logit scale: at most
#: ``1 / 0.01``, i.e. a temperature of at least 0.01.
COSINE_MAX_LOGIT_SCALE = math.log(1.0 / 0.01)


def _check_number(name: str, value, low: float, inclusive: bool = True,
                  high: Optional[float] = None) -> None:
    """``value`` is a real number ``>= low`` (``> low``), ``< high``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or (value < low if inclusive else value <= low)
            or (high is not None and value >= high)):
        bound = f'>= {low}' if inclusive else f'> {low}'
        if high is not None:
            bound += f' and < {high}'
        raise ValueError(f'{name} must be a number {bound}, got {value!r}')


class RouterLinear(nn.Module):
    """The router's gate: clean logits ``[..., D] -> [..., E]`` in float32.

    ``gate='linear'`` (V-MoE): a weight ``[E, D]``, no bias, ``l = W x``.

    ``gate='cosine'`` (Swin-MoE, arXiv 2206.03382; Tutel's ``cosine_top``;
    the cosine router of arXiv 2204.09179): the token is projected to
    ``gate_dim`` dimensions (``projector``, a linear layer with bias), and
    ``l_e = s * cos(P x, m_e)`` with learnable expert embeddings ``m``
    (``expert_embeddings [E, gate_dim]``, initialised ``N(0, 0.01^2)``) and
    a learnable ``logit_scale`` ``log s`` (``s = 1 / temperature``) clamped
    at ``log(1 / 0.01)`` in the forward pass, as Swin-MoE does.

    Both run in float32 under autocast (float64 stays float64). The noise,
    jitter and selection bias are the routers' business, not the gate's.

    Args:
        embed_dims (int): ``D``.
        num_experts (int): ``E``.
        noise_std (float): training noise is ``N(0, (noise_std / E)^2)`` on
            the logits. Defaults to 1.0.
        gate (str): 'linear' or 'cosine'. Defaults to 'linear'.
        gate_dim (int): the cosine gate's projection width. Defaults to
            256 (Swin-MoE, Tutel).
        init_temperature (float): the cosine gate's initial temperature.
            Defaults to 0.07 (Tutel's and Swin-MoE's code use 0.5).
        jitter (float): ``eps`` of Switch's multiplicative jitter: in
            training the router's input is multiplied by ``U(1 - eps, 1 +
            eps)`` noise (per element). Defaults to 0 (off).
    """

    def __init__(self,
                 embed_dims: int,
                 num_experts: int,
                 noise_std: float = 1.0,
                 gate: str = 'linear',
                 gate_dim: int = 256,
                 init_temperature: float = 0.07,
                 jitter: float = 0.0):
        super().__init__()
        if noise_std < 0:
            raise ValueError(f'noise_std must be >= 0, got {noise_std}')
        if gate not in GATES:
            raise ValueError(f'gate must be one of {GATES}, got {gate!r}')
        _check_number('jitter', jitter, 0.0, high=1.0)
        self.noise_std = noise_std
        self.gate = gate
        self.jitter = float(jitter)
        if gate == 'linear':
            self.weight = nn.Parameter(torch.empty(num_experts, embed_dims))
            # flax's default Dense init (lecun normal), as in vmoe.
            nn.init.trunc_normal_(
                self.weight,
                std=1.0 / math.sqrt(embed_dims) / .87962566103423978)
            return
        if (isinstance(gate_dim, bool)
                or not isinstance(gate_dim, numbers.Integral)
                or gate_dim < 1):
            raise ValueError(f'gate_dim must be an int >= 1, got {gate_dim!r}')
        _check_number('init_temperature', init_temperature, 0.0, False)
        self.projector = nn.Linear(embed_dims, gate_dim)
        self.expert_embeddings = nn.Parameter(
            torch.empty(num_experts, gate_dim).normal_(0.0, 0.01))
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def num_experts(self) -> int:
        """``E``."""
        if self.gate == 'linear':
            return self.weight.shape[0]
        return self.expert_embeddings.shape[0]

    def logits(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., E]`` clean logits in float32 (float64 stays).

        No noise: the same token gives the same logits in any group.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            if self.gate == 'linear':
                return F.linear(x, self.weight.to(dtype))
            projected = F.linear(x, self.projector.weight.to(dtype),
                                 self.projector.bias.to(dtype))
            cosine = F.linear(
                F.normalize(projected, dim=-1),
                F.normalize(self.expert_embeddings.to(dtype), dim=-1))
            scale = self.logit_scale.to(dtype).clamp(
                max=COSINE_MAX_LOGIT_SCALE).exp()
            return cosine * scale

    def routing_logits(self, x: Tensor) -> Tensor:
        """The logits the forward pass routes with, before the noise:
        :meth:`logits` of the jittered input in training."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter,
                                                 1.0 + self.jitter)
        return self.logits(x)

    def extra_repr(self) -> str:
        return (f'gate={self.gate}, num_experts={self.num_experts}, '
                f'noise_std={self.noise_std}, jitter={self.jitter}')


def _zero_bias_if_missing(module: nn.Module, state_dict: dict, prefix: str,
                          *args) -> None:
    """Load pre-hook: a checkpoint made without balancing (V-MoE's, a
    recycled one) starts the bias at its initial value, zero; a resumed run
    finds its own."""
    state_dict.setdefault(prefix + 'expert_bias',
                          torch.zeros_like(module.expert_bias))


class NoisyTopExpertsPerItem(RouterLinear):
    """Token-choice router: each token picks its top-K experts.

    With ``bias_balancing`` (auxiliary-loss-free balancing, arXiv
    2408.15664) a buffer ``expert_bias [E]`` is added to the gates to choose
    the experts, never to the combine weights, and at the end of every
    training forward it moves by ``b_e += rate * sign(mean load - load_e)``,
    the load being every (token, choice) pair's expert (dropped pairs too)
    summed over the batch and, under ``torch.distributed``, over all ranks
    (one ``all_reduce`` of ``E`` numbers): the bias is the same on every
    rank. The buffer is in the state dict, so a checkpoint resumes it; a
    checkpoint without it (made without balancing) loads with a zero bias.
    Activation checkpointing would re-run the update in its recomputation:
    do not combine the two.

    Args:
        embed_dims (int): ``D``.
        num_experts (int): ``E``.
        noise_std (float): training noise is ``N(0, (noise_std / E)^2)`` on
            the logits. Defaults to 1.0.
        bias_balancing (bool): auxiliary-loss-free balancing. Defaults to
            False.
        bias_update_rate (float): ``rate``, ``u`` in the paper. Defaults to
            1e-3 (the paper's).
        **gate_options: ``gate``, ``gate_dim``, ``init_temperature`` and
            ``jitter`` of :class:`RouterLinear`.
    """

    def __init__(self,
                 embed_dims: int,
                 num_experts: int,
                 noise_std: float = 1.0,
                 bias_balancing: bool = False,
                 bias_update_rate: float = 1e-3,
                 **gate_options):
        super().__init__(embed_dims, num_experts, noise_std, **gate_options)
        _check_number('bias_update_rate', bias_update_rate, 0.0)
        self.bias_balancing = bool(bias_balancing)
        self.bias_update_rate = float(bias_update_rate)
        if self.bias_balancing:
            self.register_buffer('expert_bias', torch.zeros(num_experts))
            self.register_load_state_dict_pre_hook(_zero_bias_if_missing)

    @property
    def selection_bias(self) -> Optional[Tensor]:
        """``[E]`` bias for choosing experts, or None without balancing."""
        return self.expert_bias if self.bias_balancing else None

    def forward(self,
                x: Tensor,
                top_k: int,
                capacity: Union[int, Dropless],
                batch_priority: bool = False,
                renormalize: bool = False
                ) -> Tuple[IndexDispatcher, Dict[str, Tensor]]:
        """Route ``G`` groups of ``S`` tokens.

        Args:
            x (Tensor): ``[G, S, D]``.
            top_k (int): ``K``.
            capacity (int | Dropless): ``B``, or dropless routing.
            batch_priority (bool): Batch Priority Routing.
            renormalize (bool): renormalise the K combine weights.

        Returns:
            tuple: the dispatcher (``C = G * B``) and the metrics:
            ``importance_loss``, ``gshard_loss``, ``z_loss``, ``load_loss``
            (training with noise only), ``dropped_fraction`` and
            ``expert_load`` (``[E]``).
        """
        num_experts = self.num_experts
        logits = self.routing_logits(x)
        clean_gates = logits.softmax(-1)
        metrics = {
            'importance_loss': importance_loss(clean_gates),
            'z_loss': z_loss(logits),
        }
        if self.training and self.noise_std > 0:
            sigma = self.noise_std / num_experts
            noisy_logits = logits + sigma * torch.randn_like(logits)
            gates = noisy_logits.softmax(-1)
            metrics['load_loss'] = load_loss(logits, noisy_logits, sigma,
                                             top_k)
        else:
            gates = clean_gates
        metrics['gshard_loss'] = gshard_loss(gates)
        assignment = assign_top_k(gates, top_k, capacity, batch_priority,
                                  renormalize, self.selection_bias)
        counts = expert_counts(assignment.expert_index, num_experts)
        metrics.update(routing_statistics(assignment, counts))
        dispatcher = token_choice_dispatcher(
            assignment.expert_index, assignment.slot, assignment.kept,
            assignment.weights, assignment.capacity, num_experts)
        if self.training and self.bias_balancing:
            self.update_bias(counts)
        return dispatcher, metrics

    @torch.no_grad()
    def update_bias(self, counts: Tensor) -> None:
        """``b_e += rate * sign(mean load - load_e)`` (arXiv 2408.15664).

        Args:
            counts (Tensor): ``[E]`` (token, choice) pairs each expert was
                chosen for in this forward (:func:`expert_counts`; summed
                over the ranks here when distributed).
        """
        load = counts.to(self.expert_bias.dtype)
        if (dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            load = load.clone()
            dist.all_reduce(load)
        self.expert_bias.add_(self.bias_update_rate *
                              torch.sign(load.mean() - load))


def expert_counts(expert_index: Tensor, num_experts: int) -> Tensor:
    """How many (token, choice) pairs chose each expert, dropped ones too.

    Args:
        expert_index (Tensor): ``[..., K]`` chosen experts.
        num_experts (int): ``E``.

    Returns:
        Tensor: ``[E]`` float32 counts.
    """
    with torch.no_grad():
        return torch.bincount(expert_index.reshape(-1),
                              minlength=num_experts).float()


def routing_statistics(assignment: TopKAssignment,
                       counts: Tensor) -> Dict[str, Tensor]:
    """Dropped share of (token, choice) pairs and per-expert share of pairs.

    Args:
        assignment (TopKAssignment): a token-choice assignment.
        counts (Tensor): ``[E]`` its :func:`expert_counts`.

    Returns:
        dict: ``dropped_fraction`` (scalar), ``expert_load`` (``[E]``).
    """
    with torch.no_grad():
        return {
            'dropped_fraction': 1.0 - assignment.kept.float().mean(),
            'expert_load': counts / counts.sum(),
        }


class NoisyTopItemsPerExpert(RouterLinear):
    """Expert-choice router: each expert takes its top-B tokens.

    A token may be processed by 0 to E experts; there is no auxiliary loss.

    Args:
        embed_dims (int): ``D``.
        num_experts (int): ``E``.
        noise_std (float): as in :class:`NoisyTopExpertsPerItem`.
            Defaults to 1.0.
        **gate_options: ``gate``, ``gate_dim``, ``init_temperature`` and
            ``jitter`` of :class:`RouterLinear`.
    """

    def forward(self, x: Tensor, capacity: int
                ) -> Tuple[IndexDispatcher, Dict[str, Tensor]]:
        """Route ``G`` groups of ``S`` tokens.

        Args:
            x (Tensor): ``[G, S, D]``.
            capacity (int): ``B``, at most ``S``.

        Returns:
            tuple: the dispatcher (``C = G * B``) and the metrics
            ``dropped_fraction`` (share of tokens no expert took) and
            ``expert_load`` (``[E]``, uniform by construction).
        """
        groups, group_tokens, _ = x.shape
        num_experts = self.num_experts
        if capacity > group_tokens:
            raise ValueError(
                f'expert choice needs capacity <= tokens per group, got '
                f'capacity={capacity} > {group_tokens}')
        logits = self.routing_logits(x)
        if self.training and self.noise_std > 0:
            logits = logits + (self.noise_std / num_experts) * \
                torch.randn_like(logits)
        gates = logits.softmax(-1)
        # Equal gates: the lower token index first (:func:`stable_topk`).
        weights, token_index = stable_topk(
            gates.transpose(1, 2), capacity, dim=-1)
        with torch.no_grad():
            taken = torch.zeros(groups, group_tokens, device=x.device)
            taken.scatter_(1, token_index.reshape(groups, -1), 1.0)
            metrics = {
                'dropped_fraction': 1.0 - taken.mean(),
                'expert_load': torch.full((num_experts, ),
                                          1.0 / num_experts,
                                          device=x.device),
            }
        return expert_choice_dispatcher(token_index, weights,
                                        group_tokens), metrics
