"""Channel selection: a dense ViT wider than the target, narrowed to it.

MoE Jetpack (arXiv 2406.04801) initialises ViT-T-width MoEs (192 channels)
from ViT-S (384). Here the **same** ``d'`` embedding channels are kept for
the whole model: patch and position embeddings, class token, every
LayerNorm, attention's inputs and outputs, every MLP and every expert, and
the head's inputs. The narrowed checkpoint is a dense ViT of the target's
width whose residual stream is the dense model's stream on the kept
channels; the only computation that changes is LayerNorm, whose mean and
variance are now taken over ``d'`` channels instead of ``D``. The ordinary
recycling methods then build the experts from it.

Attention heads are kept whole (``h'`` of the ``h`` dense heads, chosen per
block), which needs the target's head width to equal the dense model's
(ViT-S 6 x 64 -> ViT-T 3 x 64, ViT-B 12 x 64 -> ViT-S 6 x 64). Dense blocks
of the target whose MLP is narrower take a subset of hidden neurons with
the recycling method.

Which channels: by importance on calibration images (the LayerNorm-2
outputs, i.e. the MLP inputs, summed over blocks, as MoE Jetpack ranks
them) when statistics are given; evenly spaced for ``uniform``; at random
for ``random``; otherwise by the LayerNorm gains (how strongly each channel
feeds attention and the MLPs, summed over blocks). Heads: by the
calibrated magnitude of their outputs (attention's projection input) or,
without statistics, by the norm of their output projection.

:func:`expert_channels` serves MoE Jetpack's original layout instead, where
the trunk comes from a second, narrower checkpoint and each expert reads
and writes its own, independently chosen channels of the wide model.
"""
import re
from dataclasses import replace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .formats import DenseViT
from .methods import (RecyclingOptions, importance_indices, select_indices,
                      uniform_indices)


def _evenly_spaced(total: int, keep: int) -> np.ndarray:
    return uniform_indices(total, keep, 1)[0]


def _calibrated(stats: Optional[Dict[int, dict]], part: str,
                blocks: Sequence[int]) -> bool:
    return stats is not None and all(
        b in stats and part in stats[b] for b in blocks)


def channel_scores(dense: DenseViT,
                   stats: Optional[Dict[int, dict]] = None,
                   importance: str = 'l2') -> Tuple[np.ndarray, str]:
    """Importance of each embedding channel.

    Returns:
        tuple: scores ``[D]`` and what they are ('calibration <metric>' or
        'layernorm gains').
    """
    blocks = range(dense.num_layers)
    if _calibrated(stats, 'embed', blocks):
        scores = sum(
            np.asarray(stats[b]['embed'][importance], np.float64)
            for b in blocks)
        return scores, f'calibration {importance}'
    scores = sum(
        dense.state[f'layers.{b}.{ln}.weight'].abs().double().numpy()
        for b in blocks for ln in ('ln1', 'ln2'))
    return scores, 'layernorm gains'


def _choose(method: str, scores: np.ndarray, keep: int,
            rng: np.random.Generator) -> np.ndarray:
    """``keep`` sorted indices: random, evenly spaced or the top scores."""
    total = scores.shape[0]
    if method == 'random':
        return np.sort(rng.choice(total, keep, replace=False))
    if method == 'uniform':
        return _evenly_spaced(total, keep)
    return np.sort(np.argsort(-scores, kind='stable')[:keep])


def dense_num_heads(dense: DenseViT, head_dim: int,
                    num_heads: Optional[int] = None) -> int:
    """The dense model's heads: given, stored in the file (``.npz``), or the
    width over the target's head width."""
    width = dense.embed_dims
    heads = num_heads or dense.num_heads
    if heads is None:
        if width % head_dim:
            raise ValueError(
                f'dense width {width} is not a multiple of the target head '
                f'width {head_dim}; give the dense model\'s heads '
                '(--dense-heads)')
        heads = width // head_dim
    if width % heads or width // heads != head_dim:
        raise ValueError(
            f'channel selection keeps attention heads whole, so the head '
            f'width must match: dense {width} / {heads} heads = '
            f'{width / heads:g}, target {head_dim}')
    return heads


def head_scores(dense: DenseViT, block: int, num_heads: int,
                stats: Optional[Dict[int, dict]] = None,
                importance: str = 'l2') -> np.ndarray:
    """Importance of each attention head of a block ``[h]``."""
    head_dim = dense.embed_dims // num_heads
    if _calibrated(stats, 'attn', [block]):
        per_channel = np.asarray(stats[block]['attn'][importance], np.float64)
        return per_channel.reshape(num_heads, head_dim).sum(1)
    proj = dense.state[f'layers.{block}.attn.proj.weight'].double()
    return proj.reshape(proj.shape[0], num_heads,
                        head_dim).square().sum((0, 2)).sqrt().numpy()


def _head_channels(heads: np.ndarray, head_dim: int) -> Tensor:
    return torch.as_tensor(
        (heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1))


_BLOCK_KEY = re.compile(r'^layers\.(\d+)\.(.+)$')


def narrow_dense(dense: DenseViT, channels: np.ndarray,
                 heads: Dict[int, np.ndarray], head_dim: int,
                 hidden: Dict[int, Optional[np.ndarray]]) -> DenseViT:
    """Slice every tensor of a dense ViT to the chosen channels.

    Args:
        dense (DenseViT): the wide dense checkpoint (width ``D``).
        channels (np.ndarray): ``[d']`` kept embedding channels.
        heads (dict): block -> kept head indices ``[h']``.
        head_dim (int): width of one head.
        hidden (dict): block -> kept hidden neurons ``[H']``, or None to
            keep them all.

    Returns:
        DenseViT: a dense checkpoint of width ``d'`` (its head's inputs
        sliced too), every tensor an exact slice of the wide one.
    """
    c = torch.as_tensor(channels, dtype=torch.long)
    width = dense.embed_dims
    out = {}
    for key, value in dense.state.items():
        match = _BLOCK_KEY.match(key)
        if key in ('cls_token', 'dist_token', 'pos_embed'):
            out[key] = value[..., c]
            continue
        if key.startswith('patch_embed.projection.') or key in (
                'ln1.weight', 'ln1.bias', 'ln2.weight', 'ln2.bias'):
            out[key] = value[c]
            continue
        if match is None:
            raise ValueError(f'{key}: no channel-selection rule for this '
                             'tensor of the dense checkpoint')
        block, name = int(match.group(1)), match.group(2)
        head_ch = _head_channels(heads[block], head_dim)
        qkv_rows = torch.cat([head_ch + j * width for j in range(3)])
        neurons = hidden.get(block)
        n = (slice(None) if neurons is None else torch.as_tensor(
            neurons, dtype=torch.long))
        if name in ('ln1.weight', 'ln1.bias', 'ln2.weight', 'ln2.bias',
                    'attn.proj.bias', 'ffn.layers.1.bias'):
            out[key] = value[c]
        elif name == 'attn.qkv.weight':
            out[key] = value[qkv_rows][:, c]
        elif name == 'attn.qkv.bias':
            out[key] = value[qkv_rows]
        elif name == 'attn.proj.weight':
            out[key] = value[c][:, head_ch]
        elif name == 'ffn.layers.0.0.weight':
            out[key] = value[n][:, c]
        elif name == 'ffn.layers.0.0.bias':
            out[key] = value[n]
        elif name == 'ffn.layers.1.weight':
            out[key] = value[c][:, n]
        else:
            raise ValueError(f'{key}: no channel-selection rule for this '
                             'tensor of the dense checkpoint')
    head = dict(dense.head)
    if 'weight' in head:
        head['weight'] = head['weight'][:, c]
    kept_heads = {len(h) for h in heads.values()}
    return DenseViT({k: v.contiguous()
                     for k, v in out.items()}, head, dense.fmt,
                    kept_heads.pop() if len(kept_heads) == 1 else None)


def narrow_to_target(dense: DenseViT,
                     target: Dict[str, Tensor],
                     target_heads: int,
                     moe_blocks: Sequence[int],
                     options: RecyclingOptions,
                     rng: np.random.Generator,
                     stats: Optional[Dict[int, dict]] = None,
                     num_heads: Optional[int] = None
                     ) -> Tuple[DenseViT, dict]:
    """Choose channels, heads and (for narrower dense blocks) hidden neurons,
    and narrow the dense checkpoint to the target (see the module
    docstring).

    Args:
        dense (DenseViT): the wide checkpoint.
        target (dict): the target backbone's state dict (its shapes).
        target_heads (int): the target's attention heads.
        moe_blocks (Sequence[int]): the target's MoE blocks (their MLPs keep
            every hidden neuron here; the experts choose later).
        options (RecyclingOptions): the recycling method (it decides how
            channels are chosen) and its settings.
        rng (np.random.Generator): the sampling generator.
        stats (dict, optional): calibration statistics with ``embed`` and
            ``attn`` entries per block. Defaults to None.
        num_heads (int, optional): the dense model's heads. Defaults to None
            (from the file, or the dense width over the target head width).

    Returns:
        tuple: the narrowed :class:`DenseViT` and a report (``channels``,
        ``heads`` and ``hidden`` per block, ``channel_scores``).
    """
    width = target['patch_embed.projection.weight'].shape[0]
    if width > dense.embed_dims:
        raise ValueError(f'dense width {dense.embed_dims} is narrower than '
                         f'the target width {width}')
    head_dim = width // target_heads
    heads_total = dense_num_heads(dense, head_dim, num_heads)
    if target_heads > heads_total:
        raise ValueError(f'target has {target_heads} attention heads, the '
                         f'dense model only {heads_total}')
    method, importance = options.method, options.importance
    scores, scored_by = channel_scores(dense, stats, importance)
    channels = _choose(method, scores, width, rng)
    heads, hidden = {}, {}
    # Dense blocks are narrowed by importance where the experts use a graph.
    block_options = replace(
        options, method='importance' if method == 'graph' else method)
    for block in range(dense.num_layers):
        heads[block] = _choose(
            method, head_scores(dense, block, heads_total, stats, importance),
            target_heads, rng)
        if block in moe_blocks:
            continue
        dense_hidden = dense.feedforward_channels
        fc1 = target[f'layers.{block}.ffn.layers.0.0.weight']
        if fc1.shape[0] == dense_hidden:
            continue
        if method == 'upcycle':
            raise ValueError(
                f'layers.{block}.ffn: the target MLP has {fc1.shape[0]} '
                f'hidden neurons, the dense one {dense_hidden}; upcycling '
                'keeps widths, so choose a sampling method')
        hidden[block] = select_indices(
            block_options, dense_hidden, fc1.shape[0], 1, rng,
            None if stats is None else stats.get(block))[0]
    narrowed = narrow_dense(dense, channels, heads, head_dim, hidden)
    report = dict(
        dense_width=dense.embed_dims,
        dense_heads=heads_total,
        channel_scores=scored_by,
        channels=channels.tolist(),
        heads={f'layers.{b}': h.tolist()
               for b, h in heads.items()},
        hidden={f'layers.{b}': h.tolist()
                for b, h in hidden.items()})
    return narrowed, report


def expert_channels(options: RecyclingOptions,
                    dense: DenseViT,
                    block: int,
                    width: int,
                    count: int,
                    rng: np.random.Generator,
                    stats: Optional[Dict[int, dict]] = None) -> np.ndarray:
    """MoE Jetpack's original layout: each expert's own embedding channels
    of the wide model ``[count, width]`` — independent random subsets
    (``random``), the same evenly spaced ones (``uniform``), drawn in
    proportion to the block's calibrated MLP-input importance
    (``importance``, ``graph``; ``top`` takes the most important) or the
    top channels by :func:`channel_scores` (``upcycle``)."""
    method, importance = options.method, options.importance
    total = dense.embed_dims
    if method == 'random':
        return np.stack([
            np.sort(rng.choice(total, width, replace=False))
            for _ in range(count)
        ])
    if method == 'uniform':
        return np.tile(_evenly_spaced(total, width), (count, 1))
    if method in ('importance', 'graph') and _calibrated(
            stats, 'embed', [block]):
        scores = np.asarray(stats[block]['embed'][importance], np.float64)
        return importance_indices(scores, width, count, rng,
                                  options.selection)
    scores, _ = channel_scores(dense, stats, importance)
    return np.tile(_choose('top', scores, width, rng), (count, 1))
