"""Dense ViT weights into an MoE model's state dict (pure functions).

:func:`recycle_backbone` fills a ``VisionMoE``: every dense tensor is
copied (the position embedding resized to the target's grid), each MoE
block's experts are built from that block's dense MLP with a method of
:mod:`.methods`, and routing parameters (router, slots, temperatures, slot
norms) keep the target's fresh initialisation. :func:`recycle` does the
same for a whole classifier and copies the head when the class count fits.

A dense model wider than the target is narrowed first by channel selection
(:mod:`.channels`: the same channels for the whole model). With ``trunk``,
MoE Jetpack's original layout: every tensor but the experts comes from a
second checkpoint of the target's width, and each expert takes its own
channels of the wide model.
"""
import json
import os.path as osp
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..fileio import atomic_outputs, check_outputs
from .channels import expert_channels, narrow_to_target
from .formats import DenseViT
from .methods import RecyclingOptions, build_experts, select_indices

#: Expert groups of each MoE layer type: attribute -> report name.
EXPERT_GROUPS = (('experts', 'experts'), ('core_experts', 'core'),
                 ('univ_experts', 'universal'))


def _resize_pos_embed(pos_embed: Tensor, target: Tensor,
                      num_extra_tokens: int) -> Tensor:
    """Bicubic resize of ``[1, extra + h*w, D]`` to the target's grid."""
    from mmpretrain.models.utils import resize_pos_embed
    src = int(round((pos_embed.shape[1] - num_extra_tokens)**0.5))
    dst = int(round((target.shape[1] - num_extra_tokens)**0.5))
    return resize_pos_embed(pos_embed, (src, src), (dst, dst), 'bicubic',
                            num_extra_tokens)


def check_compatible(dense: DenseViT,
                     backbone: nn.Module,
                     allow_wider: bool = False) -> None:
    """Depth, width, heads and patch size of the dense model must be the
    target's (a wider one is narrowed later when ``allow_wider``); raise
    ``ValueError`` naming the mismatch."""
    target_depth = len(backbone.layers)
    if dense.num_layers != target_depth:
        raise ValueError(f'dense checkpoint has {dense.num_layers} blocks, '
                         f'the target model {target_depth} (depth mismatch)')
    key = 'patch_embed.projection.weight'
    ours = tuple(backbone.state_dict()[key].shape)
    theirs = tuple(dense.state[key].shape)
    wider = theirs[0] > ours[0] and allow_wider
    if ours[1:] != theirs[1:] or (ours[0] != theirs[0] and not wider):
        what = ('width' if ours[0] != theirs[0] else 'patch size'
                if ours[2:] != theirs[2:] else 'input channels')
        hint = (' (a narrower dense model cannot be recycled)'
                if allow_wider and what == 'width' else '')
        raise ValueError(f'{key}: checkpoint {theirs} vs model {ours} '
                         f'({what} mismatch){hint}')
    heads = backbone.layers[0].attn.num_heads
    if (dense.num_heads is not None and dense.num_heads != heads
            and theirs[0] == ours[0]):
        raise ValueError(f'dense checkpoint has {dense.num_heads} attention '
                         f'heads, the target model {heads}')


def check_sources(dense: DenseViT,
                  backbone: nn.Module,
                  trunk: Optional[DenseViT] = None) -> None:
    """The checks recycling runs before anything else, for callers that
    want them before a long step (calibration): ``trunk`` must match the
    target, ``dense`` may be wider (:func:`check_compatible`)."""
    if trunk is not None:
        check_compatible(trunk, backbone)
    check_compatible(dense, backbone, allow_wider=True)


def _narrow_to_target(dense: DenseViT, backbone: nn.Module,
                      target: Dict[str, Tensor], options: RecyclingOptions,
                      rng: np.random.Generator,
                      stats: Optional[Dict[int, dict]],
                      dense_heads: Optional[int],
                      report: dict) -> DenseViT:
    """A dense model wider than the target narrowed by channel selection
    (its choices added to ``report``); one of the target's width as is."""
    if dense.embed_dims == target['patch_embed.projection.weight'].shape[0]:
        return dense
    dense, channel_report = narrow_to_target(
        dense, target, backbone.layers[0].attn.num_heads,
        tuple(getattr(backbone, 'moe_layers', ())), options, rng, stats,
        dense_heads)
    report.update(channel_report)
    return dense


def _recycle_experts(layer: nn.Module, block: int, dense: DenseViT,
                     target: Dict[str, Tensor], options: RecyclingOptions,
                     rng: np.random.Generator, generator: torch.Generator,
                     stats: Optional[Dict[int, dict]],
                     own_channels: bool) -> Tuple[dict, dict, dict]:
    """One MoE block's expert groups cut from the block's dense MLP.

    Args:
        own_channels (bool): each expert takes its own embedding channels
            of ``dense`` (MoE Jetpack's original layout, with a trunk).

    Returns:
        tuple: the experts' tensors by state-dict key, each group's neuron
        indices and (``own_channels``) each group's channels, by report
        name.
    """
    fc1_w, fc1_b, fc2_w, fc2_b = dense.fc(block)
    state, neurons, channels_of = {}, {}, {}
    for attr, name in EXPERT_GROUPS:
        experts = getattr(layer, attr, None)
        if experts is None:
            continue
        count, embed_dims, width = expert_group_shape(experts)
        indices = select_indices(options, fc1_w.shape[0], width, count, rng,
                                 None if stats is None else stats.get(block))
        channels = None
        if own_channels:
            channels = expert_channels(options, dense, block, embed_dims,
                                       count, rng, stats)
            channels_of[name] = channels.tolist()
        tensors = build_experts(fc1_w, fc1_b, fc2_w, fc2_b, indices,
                                channels)
        for tensor_name, value in zip(('w1', 'b1', 'w2', 'b2'), tensors):
            key = f'layers.{block}.ffn.{attr}.{tensor_name}'
            value = with_expert_noise(tensor_name, value, options.noise,
                                      generator)
            state[key] = value.to(target[key].dtype)
        neurons[name] = indices.tolist()
    return state, neurons, channels_of


def expert_group_shape(experts: nn.Module) -> Tuple[int, int, int]:
    """``(E, D, W)`` of a batched-experts module: all ``E`` experts, also
    when expert parallelism keeps ``E/P`` of them on this rank (recycled
    weights are full; loading slices them)."""
    count, embed_dims, width = experts.w1.shape
    shard = getattr(experts, 'expert_shard', None)
    return (count if shard is None else shard.num_experts, embed_dims, width)


def with_expert_noise(tensor_name: str, value: Tensor, noise: float,
                      generator: torch.Generator) -> Tensor:
    """``value`` plus Gaussian noise of std ``noise`` when it is an expert
    kernel (``w1`` / ``w2``; biases stay exact)."""
    if noise > 0 and tensor_name in ('w1', 'w2'):
        value = value + noise * torch.randn(
            value.shape, generator=generator, dtype=value.dtype)
    return value


def copy_remaining(target: Dict[str, Tensor],
                   source: Dict[str, Tensor],
                   state: dict,
                   used: set,
                   report: dict,
                   skip: Tuple[str, ...] = (),
                   adapt: Optional[Callable[[str, Tensor, Tensor],
                                            Tensor]] = None) -> None:
    """Every ``target`` tensor not in ``state`` yet: copied from ``source``
    when it has the key and the key starts with none of ``skip``, else left
    fresh (the target's own value).

    Args:
        target (dict[str, Tensor]): the target model's state dict.
        source (dict[str, Tensor]): the dense checkpoint's tensors.
        state (dict): the state being built; filled in place.
        used (set): source keys consumed; updated in place.
        report (dict): its ``copied`` and ``fresh`` lists are appended to.
        skip (tuple[str, ...]): key prefixes never copied (the MoE blocks'
            dense MLPs, which the experts replace).
        adapt (callable, optional): ``adapt(key, source_value,
            target_value)`` returns the source value reshaped to fit (e.g.
            a resized position embedding).

    Raises:
        ValueError: a copied tensor's shape differs from the target's.
    """
    for key, value in target.items():
        if key in state:
            continue
        if key in source and not key.startswith(skip):
            value_in = source[key]
            if adapt is not None:
                value_in = adapt(key, value_in, value)
            if tuple(value_in.shape) != tuple(value.shape):
                raise ValueError(f'{key}: checkpoint '
                                 f'{tuple(value_in.shape)} vs model '
                                 f'{tuple(value.shape)}')
            state[key] = value_in.to(value.dtype)
            report['copied'].append(key)
            used.add(key)
        else:
            state[key] = value.clone()
            report['fresh'].append(key)


def _copy_dense_tensors(backbone: nn.Module, target: Dict[str, Tensor],
                        source: DenseViT, state: dict, used: set,
                        report: dict) -> None:
    """Every target tensor not built yet: copied from ``source`` (the
    position embedding resized to the target's grid), or left fresh."""
    moe_blocks = tuple(getattr(backbone, 'moe_layers', ()))
    num_extra = getattr(backbone, 'num_extra_tokens', 1)

    def resize_pos_embed(key, value_in, value):
        if key == 'pos_embed' and value_in.shape != value.shape:
            return _resize_pos_embed(value_in, value, num_extra)
        return value_in

    copy_remaining(target, source.state, state, used, report,
                   skip=tuple(f'layers.{i}.ffn.' for i in moe_blocks),
                   adapt=resize_pos_embed)


def recycle_backbone(dense: DenseViT,
                     backbone: nn.Module,
                     method: str = 'upcycle',
                     stats: Optional[Dict[int, dict]] = None,
                     noise: float = 0.0,
                     seed: int = 0,
                     importance: str = 'l2',
                     selection: str = 'sample',
                     graph: str = 'louvain',
                     trunk: Optional[DenseViT] = None,
                     dense_heads: Optional[int] = None) -> Tuple[dict, dict]:
    """Build a ``VisionMoE`` state dict from a dense ViT.

    Args:
        dense (DenseViT): the canonical dense checkpoint (as wide as the
            target, or wider: then narrowed by channel selection).
        backbone (nn.Module): the target ``VisionMoE`` (its own tensors are
            the fresh values of the routing parameters).
        method (str): 'upcycle', 'random', 'uniform', 'importance' or
            'graph'. Defaults to 'upcycle'.
        stats (dict, optional): block -> calibration statistics, for
            'importance' and 'graph' (and the channel ranking, with
            ``embed`` / ``attn`` entries). Defaults to None.
        noise (float): std of Gaussian noise added to upcycled expert
            kernels (breaks their symmetry). Defaults to 0.
        seed (int): seed of the sampling and the noise. Defaults to 0.
        importance (str): 'l1', 'l2' or 'freq'. Defaults to 'l2'.
        selection (str): importance 'sample' or 'top'. Defaults to 'sample'.
        graph (str): 'louvain', 'spectral' or 'metis'. Defaults to
            'louvain'.
        trunk (DenseViT, optional): a checkpoint of the target's width for
            every tensor but the experts, which are then cut from ``dense``
            with their own channels each (MoE Jetpack's original layout).
            Defaults to None.
        dense_heads (int, optional): attention heads of a wider ``dense``
            when the file does not store them. Defaults to None (the dense
            width over the target's head width).

    Returns:
        tuple: the state dict (every key of ``backbone``) and a report:
        ``copied``, ``sampled``, ``fresh``, ``unused`` key lists and
        ``experts`` (per MoE block and group, each expert's neuron
        indices); with channel selection ``channels``, ``heads``,
        ``hidden``; with a trunk ``expert_channels``.
    """
    if noise < 0:
        raise ValueError(f'noise must be >= 0, got {noise}')
    options = RecyclingOptions(method, importance, selection, graph, seed,
                               noise)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    target = backbone.state_dict()
    report = dict(copied=[], sampled=[], fresh=[], experts={})
    check_sources(dense, backbone, trunk)
    if trunk is not None:
        report['expert_channels'] = {}
    else:
        dense = _narrow_to_target(dense, backbone, target, options, rng,
                                  stats, dense_heads, report)
    state, used = {}, set()
    for i in getattr(backbone, 'moe_layers', ()):
        experts, neurons, channels = _recycle_experts(
            backbone.layers[i].ffn, i, dense, target, options, rng,
            generator, stats, own_channels=trunk is not None)
        state.update(experts)
        report['sampled'].extend(experts)
        used.update(f'layers.{i}.ffn.layers.{n}' for n in (
            '0.0.weight', '0.0.bias', '1.weight', '1.bias'))
        report['experts'][f'layers.{i}'] = neurons
        if trunk is not None:
            report['expert_channels'][f'layers.{i}'] = channels
    if trunk is not None:
        used = set()  # the wide model gave the experts only
    source = dense if trunk is None else trunk
    _copy_dense_tensors(backbone, target, source, state, used, report)
    report['unused'] = sorted(set(source.state) - used)
    return state, report


def whole_model_state(model: nn.Module, backbone_state: Dict[str, Tensor],
                      report: dict,
                      head_sources: Dict[str, Optional[Tensor]]) -> dict:
    """The whole model's state dict from its recycled backbone's.

    Backbone keys (and the report's ``copied`` / ``sampled`` / ``fresh``
    lists, in place) get the ``backbone.`` prefix; every other key of
    ``model`` is copied from ``head_sources`` when given there with the
    model's shape, else left fresh (the model's own value).
    """
    state = {f'backbone.{k}': v for k, v in backbone_state.items()}
    for name in ('copied', 'sampled', 'fresh'):
        report[name] = [f'backbone.{k}' for k in report[name]]
    for key, value in model.state_dict().items():
        if key in state:
            continue
        source = head_sources.get(key)
        if source is not None and tuple(source.shape) == tuple(value.shape):
            state[key] = source.to(value.dtype)
            report['copied'].append(key)
        else:
            state[key] = value.clone()
            report['fresh'].append(key)
    return state


def find_head_keys(model: nn.Module) -> Optional[Tuple[str, str]]:
    """The classifier ``(weight, bias)`` keys of an MMPretrain head."""
    keys = model.state_dict()
    for name in ('head.fc', 'head.layers.head'):
        if f'{name}.weight' in keys:
            return f'{name}.weight', f'{name}.bias'
    return None


def recycle(dense: DenseViT,
            model: nn.Module,
            fresh_head: bool = False,
            **kwargs) -> Tuple[dict, dict]:
    """:func:`recycle_backbone` for a classifier (``backbone.`` keys) plus
    the head: copied when its shape fits (unless ``fresh_head``), else left
    fresh (reported).

    Args:
        dense (DenseViT): the canonical dense checkpoint.
        model (nn.Module): the target classifier.
        fresh_head (bool): keep the target's own head initialisation, e.g.
            for a new task with as many classes. Defaults to False.
        **kwargs: the options of :func:`recycle_backbone`.

    Returns:
        tuple: the classifier's full state dict and the report.
    """
    backbone_state, report = recycle_backbone(dense, model.backbone, **kwargs)
    head = dict(dense.head)
    if kwargs.get('trunk') is not None:
        head = dict(kwargs['trunk'].head)
    elif 'channels' in report and 'weight' in head:
        head['weight'] = head['weight'][:, report['channels']]
    head_keys = find_head_keys(model)
    head_sources = {}
    if head_keys is not None and head and not fresh_head:
        head_sources = dict(zip(head_keys, (head.get('weight'),
                                            head.get('bias'))))
    state = whole_model_state(model, backbone_state, report, head_sources)
    if (head and head_keys and head_keys[0] in report['fresh']
            and not fresh_head):
        report['head_note'] = (
            f'head left fresh: checkpoint '
            f"{tuple(head['weight'].shape)} vs model "
            f'{tuple(model.state_dict()[head_keys[0]].shape)}')
    return state, report


def save_recycled(state: Dict[str, Tensor],
                  report: dict,
                  out: str,
                  force: bool = False,
                  safetensors: bool = False,
                  meta: Optional[dict] = None) -> Tuple[str, str]:
    """Write the weights (``{'state_dict': ..., 'meta': meta}`` or
    ``.safetensors``, which has no place for ``meta``) and the JSON report
    beside them, each to a temporary name then renamed; an existing output
    is kept unless ``force``.

    Returns:
        tuple: the weights path and the report path.
    """
    if safetensors and not out.endswith('.safetensors'):
        out = osp.splitext(out)[0] + '.safetensors'
    report_path = osp.splitext(out)[0] + '.json'
    check_outputs([out, report_path], force)
    with atomic_outputs([out, report_path]) as (tmp, tmp_report):
        tensors = {k: v.contiguous() for k, v in state.items()}
        if safetensors:
            from safetensors.torch import save_file
            save_file(tensors, tmp)
        else:
            torch.save(dict(state_dict=tensors, **({
                'meta': meta
            } if meta else {})), tmp)
        with open(tmp_report, 'w') as f:
            json.dump(report, f, indent=1)
    return out, report_path
