"""Evaluate a trained model at other test-time routings, no retraining.

V-MoE's adaptive inference (arXiv 2106.05974, section 4): ``K``, the
capacity factor and Batch Priority Routing are configuration, changed on the
loaded model with :func:`~moe_plugin.layers.set_eval_routing`; each setting
gives a top-1 accuracy and the fraction of (token, choice) pairs the experts
processed (the rest were dropped for lack of capacity).
"""
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from moe_plugin.layers import SparseMoE, set_eval_routing

from .recording import RoutingRecorder, find_moe_layers

Batches = Callable[[], Iterable[Tuple[Tensor, Tensor]]]


def model_logits(model: nn.Module, inputs: Tensor) -> Tensor:
    """The logits ``[B, classes]`` of a classifier (or a backbone's last
    output)."""
    from mmengine.model import BaseModel
    if isinstance(model, BaseModel):
        out = model(inputs, mode='tensor')
    else:
        out = model(inputs)
    # A bare backbone returns a tuple of outputs: the last one.
    return out[-1] if isinstance(out, (tuple, list)) else out


def evaluate_routing(model: nn.Module,
                     batches: Iterable[Tuple[Tensor, Tensor]]) -> Dict:
    """Top-1 and processed fraction of the model's current eval routing.

    Args:
        model (nn.Module): in evaluation mode; ``model(inputs,
            mode='tensor')`` (an MMEngine model) or ``model(inputs)`` gives
            the logits.
        batches (Iterable): ``(inputs, labels)`` pairs.

    Returns:
        dict: ``top1`` (percent), ``images``, ``processed_fraction`` (over
        all MoE layers' pairs) and ``layers`` (name -> its fraction).
    """
    correct = images = 0
    processed: Dict[str, int] = {}
    pairs: Dict[str, int] = {}
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        for inputs, labels in batches:
            logits = model_logits(model, inputs)
            correct += int((logits.argmax(-1) == labels.to(
                logits.device)).sum())
            images += labels.numel()
            for name, routing in recorder.last.items():
                processed[name] = processed.get(name, 0) + routing.processed
                pairs[name] = pairs.get(name, 0) + routing.pairs
    if images == 0:
        raise ValueError('no image to evaluate: the data split is empty')
    return dict(
        top1=100.0 * correct / images,
        images=images,
        processed_fraction=sum(processed.values()) / sum(pairs.values()),
        layers={name: processed[name] / pairs[name]
                for name in processed})


def check_sweep(model: nn.Module, capacities: Sequence[float],
                top_ks: Sequence[Optional[int]]) -> List[SparseMoE]:
    """Validate a sweep before running any of it; the sparse layers."""
    layers = [m for m in find_moe_layers(model).values()
              if isinstance(m, SparseMoE)]
    if not layers:
        raise ValueError(
            'the capacity sweep changes the routing of SparseMoE layers and '
            'this model has none (Soft MoE and SpheroMoE drop no token)')
    if not capacities:
        raise ValueError('give at least one capacity factor')
    for factor in capacities:
        if not (isinstance(factor, (int, float)) and math.isfinite(factor)
                and factor > 0):
            raise ValueError(
                f'capacity factors must be finite and > 0, got {factor!r}')
    for top_k in top_ks:
        if top_k is None:
            continue
        for layer in layers:
            if not 1 <= top_k <= layer.num_experts:
                raise ValueError(
                    f'top-k {top_k} is not in [1, num_experts='
                    f'{layer.num_experts}] of every MoE layer')
    return layers


def capacity_sweep(model: nn.Module,
                   batches: Batches,
                   capacities: Sequence[float],
                   top_ks: Sequence[Optional[int]] = (None, ),
                   batch_priorities: Sequence[Optional[bool]] = (None, )
                   ) -> List[Dict]:
    """Evaluate every (K, BPR, capacity factor) setting.

    The layers' evaluation routing is restored afterwards.

    Args:
        model (nn.Module): in evaluation mode.
        batches (callable): returns a fresh iterable of ``(inputs,
            labels)`` for each setting.
        capacities (Sequence[float]): capacity factors, each > 0.
        top_ks (Sequence[int | None]): ``K`` values; None keeps the
            layers'. Defaults to ``(None,)``.
        batch_priorities (Sequence[bool | None]): BPR off/on; None keeps
            the layers'. Defaults to ``(None,)``.

    Returns:
        list[dict]: one row per setting: ``capacity_factor``, ``top_k``,
        ``batch_priority`` (the values in force, read back from the first
        layer) and the fields of :func:`evaluate_routing`.
    """
    layers = check_sweep(model, capacities, top_ks)
    saved = [(m.eval_top_k, m.eval_capacity_factor, m.eval_batch_priority)
             for m in layers]
    rows = []
    try:
        for top_k in top_ks:
            for priority in batch_priorities:
                for factor in capacities:
                    set_eval_routing(
                        model,
                        top_k=top_k,
                        capacity_factor=float(factor),
                        batch_priority=priority)
                    result = evaluate_routing(model, batches())
                    first = layers[0]
                    rows.append(
                        dict(
                            capacity_factor=first.eval_capacity_factor,
                            top_k=first.eval_top_k,
                            batch_priority=first.eval_batch_priority,
                            **result))
    finally:
        for layer, (top_k, factor, priority) in zip(layers, saved):
            layer.eval_top_k = top_k
            layer.eval_capacity_factor = factor
            layer.eval_batch_priority = priority
    return rows
