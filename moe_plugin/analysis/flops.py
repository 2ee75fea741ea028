"""Parameters and FLOPs per image of a model, dense and MoE parts apart.

FLOPs are ``2 x`` multiply-accumulates of the matrix products, the
convention of ``torch.utils.flop_counter`` (normalisations, activations and
softmaxes are not counted). They are measured with
:class:`~torch.utils.flop_counter.FlopCounterMode` over one forward pass,
which sees every ``linear``, ``conv``, ``bmm``/``baddbmm`` and ``einsum``,
so an MoE layer's experts are counted as they run: over the whole static
buffer ``[E, B, D]``, padding included. Two things it does not see are
counted analytically:

- fused attention on CPU (``scaled_dot_product_attention`` dispatches to a
  kernel the counter has no formula for): ``2 * B * heads * Lq * Lk *
  (Dk + Dv)`` per call, added to the dense part unless the counter already
  counted an attention kernel;
- the sparse combine ``y_n = sum_k w_nk out_nk``, elementwise:
  ``2 * N * K * D`` per layer (a multiply-add per choice and channel).

Active parameters: everything outside the MoE layers' experts, plus each
MoE layer's experts times the experts a token uses: ``K`` (token choice),
``E * B / S`` (expert choice: slots per token), ``E * p / N`` (Soft MoE and
SpheroMoE: slots per token, per expert group).
"""
import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from moe_plugin.layers import SparseMoE
from moe_plugin.layers.routing import dispatcher_capacity

from .recording import find_moe_layers


def attention_flops(query: Tensor, key: Tensor, value: Tensor) -> int:
    """FLOPs of ``softmax(q k^T) v``: ``2 * B * H * Lq * Lk * (Dk + Dv)``.

    Args:
        query (Tensor): ``[..., Lq, Dk]``.
        key (Tensor): ``[..., Lk, Dk]``.
        value (Tensor): ``[..., Lk, Dv]``.
    """
    batch = math.prod(query.shape[:-2])
    length_q, dims_k = query.shape[-2:]
    length_k, dims_v = key.shape[-2], value.shape[-1]
    return 2 * batch * length_q * length_k * (dims_k + dims_v)


class _CountAttention(TorchFunctionMode):
    """Adds up :func:`attention_flops` of every fused attention call."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = args[0] if args else kwargs['query']
            key = args[1] if len(args) > 1 else kwargs['key']
            value = args[2] if len(args) > 2 else kwargs['value']
            self.flops += attention_flops(query, key, value)
        return func(*args, **kwargs)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(model: nn.Module,
                inputs: Tensor,
                forward=None) -> Dict:
    """Measure parameters and FLOPs per image, dense and MoE parts apart.

    The model runs once, in its current mode (the MoE layers use their
    training or evaluation routing accordingly), on ``inputs``; every figure
    is divided by the number of images.

    Args:
        model (nn.Module): the model.
        inputs (Tensor): ``[B, C, H, W]`` images; ``B`` must be a whole
            number of routing groups.
        forward (callable, optional): ``forward(model, inputs)``; defaults
            to ``model(inputs)``.

    Returns:
        dict: ``images``; ``params`` (``total``, ``active``, ``dense``,
        ``moe``, ``moe_active``); ``flops`` per image (``total``,
        ``dense``, ``moe``, ``attention_analytic``); ``layers``: one dict per
        MoE layer (see :func:`_layer_figures`).
    """
    images = inputs.shape[0]
    layers = find_moe_layers(model)
    seen = {}
    handles = []
    for name, layer in layers.items():
        handles.append(
            layer.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(
                    name, {}).update(tokens=args[0].shape[1])))
        if isinstance(layer, SparseMoE):
            handles.append(
                layer.router.register_forward_hook(
                    _router_probe(seen, name, layer)))
    counter = FlopCounterMode(display=False)
    attention = _CountAttention()
    # FlopCounterMode's module tracker hooks the inputs that require grad;
    # under no_grad a parameter given to a submodule directly (timm's
    # attention pool passes its latent query) has no grad_fn and fails it.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        with torch.no_grad(), counter, attention:
            if forward is None:
                model(inputs)
            else:
                forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for param in trainable:
            param.requires_grad_(True)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    total = sum(counts.get('Global', {}).values())
    counted_attention = any('attention' in str(op)
                            for op in counts.get('Global', {}))
    attention_extra = 0 if counted_attention else attention.flops

    def measured(module_name: str) -> int:
        return sum(counts.get(f'{root}.{module_name}', {}).values())

    full_names = {
        module: name
        for name, module in getattr(model, 'module', model).named_modules()
    }
    rows = []
    for name, layer in layers.items():
        rows.append(
            _layer_figures(name, layer, full_names[layer], seen.get(name, {}),
                           measured, images))
    total_params = _numel(model)
    moe_params = sum(row['params'] for row in rows)
    moe_active = sum(row['active_params'] for row in rows)
    moe_flops = sum(row['flops'] for row in rows)
    combine = sum(row['flops_combine'] for row in rows)
    total_flops = (total + combine * images + attention_extra) / images
    return dict(
        images=images,
        params=dict(
            total=total_params,
            active=total_params - moe_params + moe_active,
            dense=total_params - moe_params,
            moe=moe_params,
            moe_active=moe_active),
        flops=dict(
            total=total_flops,
            dense=total_flops - moe_flops,
            moe=moe_flops,
            attention_analytic=attention_extra / images),
        layers=rows)


def _router_probe(seen: dict, name: str, layer: SparseMoE):
    """Forward hook of a sparse router: its groups, and the capacity and
    ``K`` the layer routed them with."""

    def hook(router, args, output):
        groups = args[0]
        arguments = layer.router_arguments(groups.shape[1])
        seen.setdefault(name, {}).update(
            groups=groups.shape[0],
            group_tokens=groups.shape[1],
            capacity=dispatcher_capacity(output[0], groups.shape[0]),
            top_k=arguments.get('top_k'))

    return hook


def _layer_figures(name: str, layer: nn.Module, full_name: str, seen: dict,
                   measured, images: int) -> Dict:
    """One MoE layer's parameters and FLOPs per image.

    Returns:
        dict: ``name``, ``kind``, ``num_experts``, ``params``,
        ``active_params``, ``experts_per_token``; sparse layers also
        ``top_k``, ``capacity`` (``B``), ``group_tokens`` (``S``),
        ``slots`` and ``assignments`` per group (``E * B`` and ``S * K``)
        and ``padding_slots`` (``max(E * B - S * K, 0)``); soft layers
        ``slots_per_expert``. FLOPs per image: ``flops_router`` (everything
        but the experts: router, token/slot mixing), ``flops_experts`` (the
        whole buffer), ``flops_padding`` (its share beyond the ``S * K``
        assignments), ``flops_combine`` (analytic) and ``flops``, their
        total.
    """
    experts = layer.expert_groups()
    expert_flops = sum(
        measured(f'{full_name}.{sub}') for sub in experts) / images
    layer_flops = measured(full_name) / images
    tokens = seen.get('tokens', 0)
    row = dict(name=name, params=_numel(layer),
               num_experts=layer.num_experts)
    expert_params = sum(_numel(m) for m in experts.values())
    combine = 0.0
    padding = 0.0
    if isinstance(layer, SparseMoE):
        (expert_group, ) = experts.values()
        per_expert = expert_params / layer.num_experts
        group_tokens = seen['group_tokens']
        capacity = seen['capacity']
        slots = layer.num_experts * capacity
        if seen.get('top_k') is not None:
            kind, top_k = 'token_choice', seen['top_k']
            per_token = top_k
            dims = expert_group.w1.shape[1]
            combine = 2.0 * tokens * top_k * dims
        else:
            kind, top_k = 'expert_choice', 1
            per_token = slots / group_tokens
        assignments = group_tokens * top_k
        padding_slots = max(slots - assignments, 0)
        padding = expert_flops * padding_slots / slots
        row.update(kind=kind, top_k=top_k, capacity=capacity,
                   group_tokens=group_tokens, slots=slots,
                   assignments=assignments, padding_slots=padding_slots)
        active_experts = per_token * per_expert
    else:
        row.update(kind='soft', slots_per_expert=layer.slots_per_expert)
        active_experts = 0.0
        per_token = layer.num_experts * layer.slots_per_expert / tokens
        for group in experts.values():
            # Each of the group's experts runs p slots for N tokens.
            active_experts += _numel(group) * layer.slots_per_expert / tokens
    row.update(
        experts_per_token=per_token,
        active_params=row['params'] - expert_params + active_experts,
        flops_router=layer_flops - expert_flops,
        flops_experts=expert_flops,
        flops_padding=padding,
        flops_combine=combine,
        flops=layer_flops + combine)
    return row
