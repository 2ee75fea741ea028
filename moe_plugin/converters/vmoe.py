"""V-MoE's released checkpoints into an MMPretrain ``MoEImageClassifier``.

:mod:`.vmoe_checkpoint` reads the checkpoint (``PREFIX.index`` plus
``PREFIX.data-nnnnn-of-NNNNN`` msgpack shards); this module maps its
parameter tree (``vmoe/nn/vit_moe.py``) to our names, as
:mod:`moe_plugin.recycling.formats` maps the dense big_vision / vit_jax ViTs
(its reader converts the trunk: kernel ``(D, H, Dh)`` reshaped and
transposed into one ``qkv`` weight, Dense kernels transposed, LayerNorm
``scale`` as ``weight``, the patch kernel ``(p, p, 3, D)`` as
``(D, 3, p, p)``), plus the MoE blocks (sparse: ``Moe/Router/dense/kernel``
``(D, E)`` and stacked experts ``Moe/Mlp/Dense_0/kernel`` ``(E, D, F)``;
Soft MoE: ``Moe/Router/{mu, scale}``), the ``token`` / ``gap`` / ``map``
heads (``MapHead`` into timm's ``AttentionPoolLatent``), ``pre_logits``
(Dense + tanh, MMPretrain's ``VisionTransformerClsHead(hidden_dim=...)``)
and ``head``. :func:`vmoe_to_mmpretrain` infers the architecture from the
shapes; :func:`model_config` writes the ``model`` config.
"""
import math
import re
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from moe_plugin.recycling.formats import DenseViT, big_vision_to_canonical

from .vmoe_checkpoint import read_vmoe_checkpoint

#: Routing settings a V-MoE checkpoint does not hold, at V-MoE's values
#: (``vmoe/configs/vmoe_paper/common.py``: K = 2, capacity factor 1.05,
#: groups of 8 images, no BPR; its ImageNet configs evaluate with capacity
#: factor 4.0).
VMOE_ROUTING_DEFAULTS = dict(
    top_k=2,
    capacity_factor=1.05,
    eval_capacity_factor=4.0,
    batch_priority=False,
    group_size=8,
    eval_group_size=None)


# --- mapping -----------------------------------------------------------------
#: The dense trunk: V-MoE names -> the big_vision names that
#: :func:`moe_plugin.recycling.formats.big_vision_to_canonical` converts.
_TRUNK_RULES = [
    (r'^(cls|embedding/(kernel|bias))$', r'\1'),
    (r'^Encoder/posembed_input/pos_embedding$', 'pos_embedding'),
    (r'^Encoder/encoderblock_(\d+)/(LayerNorm_[01])/(scale|bias)$',
     r'Transformer/encoderblock_\1/\2/\3'),
    (r'^Encoder/encoderblock_(\d+)/SelfAttention/(query|key|value|out)/'
     r'(kernel|bias)$',
     r'Transformer/encoderblock_\1/MultiHeadDotProductAttention_0/\2/\3'),
    (r'^Encoder/encoderblock_(\d+)/Mlp/(Dense_[01])/(kernel|bias)$',
     r'Transformer/encoderblock_\1/MlpBlock_0/\2/\3'),
    (r'^Encoder/encoder_norm/(scale|bias)$', r'Transformer/encoder_norm/\1'),
    (r'^head/(kernel|bias)$', r'head/\1'),
]
_MOE_RE = re.compile(r'^Encoder/encoderblock_(\d+)/Moe/(.+)$')
_MOE_NAMES = {
    'Router/dense/kernel': ('router.weight', lambda a: a.T),
    'Router/mu': ('mu', None),
    'Router/scale': ('scale', None),
    'Mlp/Dense_0/kernel': ('experts.w1', None),
    'Mlp/Dense_0/bias': ('experts.b1', None),
    'Mlp/Dense_1/kernel': ('experts.w2', None),
    'Mlp/Dense_1/bias': ('experts.b2', None),
}


class VMoEArch(NamedTuple):
    """The architecture of a V-MoE checkpoint, read from its shapes.

    Attributes:
        embed_dims, num_layers, num_heads, feedforward_channels (int): the
            ViT (``feedforward_channels`` of the dense blocks, or of the
            experts when every block is an MoE block).
        patch_size, img_size, in_channels (int): the patch embedding and the
            image size its position embeddings were trained for.
        moe_layers (tuple): 0-based MoE block indices.
        moe_type (str, optional): 'sparse' or 'soft'; None without MoE.
        num_experts (int): experts per MoE block (0 without MoE).
        slots_per_expert (int): Soft MoE's slots per expert (0 if sparse).
        expert_hidden (int): hidden width of an expert (0 without MoE).
        classifier (str): 'token', 'gap' or 'map'.
        representation_size (int, optional): the tanh ``pre_logits`` width.
        num_classes (int): classes of ``head``.
    """
    embed_dims: int
    num_layers: int
    num_heads: int
    feedforward_channels: int
    patch_size: int
    img_size: int
    in_channels: int
    moe_layers: Tuple[int, ...]
    moe_type: Optional[str]
    num_experts: int
    slots_per_expert: int
    expert_hidden: int
    classifier: str
    representation_size: Optional[int]
    num_classes: int


def _tensor(array: np.ndarray) -> Tensor:
    # np.array, not np.ascontiguousarray: that makes scalars 1-D.
    return torch.from_numpy(np.array(array, dtype=np.float32, order='C'))


def _map_head(params: Dict[str, np.ndarray], used: set) -> Dict[str, Tensor]:
    """vmoe's ``MapHead`` as timm's ``AttentionPoolLatent`` (``attn_pool``).

    MapHead: a probe ``(1, 1, D)`` attends over the tokens with flax
    attention kernels ``(D, H, Dh)`` / ``(H, Dh, D)``; then ``x + Mlp(LN(x))``.
    """

    def get(name):
        key = 'MapHead/' + name
        if key not in params:
            raise ValueError(f'V-MoE MapHead lacks {key!r}')
        used.add(key)
        return params[key]

    attn = 'MultiHeadDotProductAttention/'
    dims = get('probe').shape[-1]

    def in_proj(name):
        return (get(f'{attn}{name}/kernel').reshape(dims, -1).T,
                get(f'{attn}{name}/bias').reshape(-1))

    (qw, qb), (kw, kb), (vw, vb) = (in_proj(n)
                                    for n in ('query', 'key', 'value'))
    out = {
        'latent': get('probe'),
        'q.weight': qw,
        'q.bias': qb,
        'kv.weight': np.concatenate([kw, vw]),
        'kv.bias': np.concatenate([kb, vb]),
        'proj.weight': get(f'{attn}out/kernel').reshape(-1, dims).T,
        'proj.bias': get(f'{attn}out/bias'),
        'norm.weight': get('LayerNorm/scale'),
        'norm.bias': get('LayerNorm/bias'),
    }
    for r, ours in ((0, 'fc1'), (1, 'fc2')):
        out[f'mlp.{ours}.weight'] = get(f'Mlp/Dense_{r}/kernel').T
        out[f'mlp.{ours}.bias'] = get(f'Mlp/Dense_{r}/bias')
    return {f'backbone.attn_pool.{k}': _tensor(v) for k, v in out.items()}


def _check_classifier(params: Dict[str, np.ndarray]) -> None:
    """The keys without which a tree is no V-MoE ViT classifier."""
    for key in ('embedding/kernel', 'Encoder/posembed_input/pos_embedding',
                'head/kernel'):
        if key not in params:
            raise ValueError(
                f'not a V-MoE ViT classifier (unknown architecture): no '
                f'{key!r} (learned position embeddings and a head are '
                f'required); its keys include {sorted(params)[:8]}')


def _split_trunk_and_moe(params: Dict[str, np.ndarray], used: set
                         ) -> Tuple[Dict[str, np.ndarray],
                                    Dict[int, Dict[str, np.ndarray]]]:
    """The dense trunk under big_vision names, and the MoE blocks' leaves.

    Returns:
        tuple: ``{big_vision name: array}`` (:data:`_TRUNK_RULES`) and
        ``{block: {name under Moe/: array}}`` (:data:`_MOE_NAMES`).
    """
    trunk, moe = {}, {}
    for key, value in params.items():
        for pattern, replacement in _TRUNK_RULES:
            if re.match(pattern, key):
                trunk[re.sub(pattern, replacement, key)] = value
                used.add(key)
                break
        else:
            match = _MOE_RE.match(key)
            if match and match.group(2) in _MOE_NAMES:
                moe.setdefault(int(match.group(1)), {})[match.group(2)] = value
                used.add(key)
    return trunk, moe


def _patch_embedding(params: Dict[str, np.ndarray]) -> Tuple[int, int, int]:
    """``(patch size, input channels, D)`` of the square patch kernel."""
    kernel = params['embedding/kernel']
    patch, _, in_channels, dims = kernel.shape
    if kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f'embedding/kernel {kernel.shape}: only square '
                         'patches are supported')
    return patch, in_channels, dims


def _map_trunk(trunk: Dict[str, np.ndarray],
               moe_layers: Tuple[int, ...]) -> Tuple[Dict[str, Tensor],
                                                     DenseViT]:
    """The dense trunk (every block but the MoE blocks' MLPs) as
    ``backbone.*`` tensors, and its canonical form."""
    dense = big_vision_to_canonical(trunk, blocks_without_mlp=moe_layers)
    bad = [block for block in moe_layers if block >= dense.num_layers]
    if bad:
        raise ValueError(f'MoE blocks {bad} lie beyond the '
                         f'{dense.num_layers} encoder blocks')
    return {'backbone.' + k: v for k, v in dense.state.items()}, dense


def _map_moe(moe: Dict[int, Dict[str, np.ndarray]]
             ) -> Tuple[Dict[str, Tensor], Tuple]:
    """The MoE blocks' router and experts as ``backbone.layers.*.ffn.*``.

    Returns:
        tuple: the tensors and ``(moe_type, num_experts, slots_per_expert,
        expert_hidden)``, ``(None, 0, 0, 0)`` without MoE blocks.
    """
    state, kinds = {}, {}
    for block, names in moe.items():
        if 'Router/dense/kernel' in names:
            if names['Router/dense/kernel'].ndim != 2:
                raise ValueError(
                    f'MoE block {block}: Router/dense/kernel of shape '
                    f"{names['Router/dense/kernel'].shape} is not (D, E): an "
                    'E3 ensemble router (unknown architecture, not supported)')
            kind = 'sparse'
            experts, slots = names['Router/dense/kernel'].shape[1], 0
        elif 'Router/mu' in names:
            kind = 'soft'
            _, experts, slots = names['Router/mu'].shape
        else:
            raise ValueError(f'MoE block {block} has no router (neither '
                             'Router/dense/kernel nor Router/mu)')
        hidden = names['Mlp/Dense_0/kernel'].shape[-1] if \
            'Mlp/Dense_0/kernel' in names else 0
        kinds[block] = (kind, experts, slots, hidden)
        for name, value in names.items():
            ours, transform = _MOE_NAMES[name]
            state[f'backbone.layers.{block}.ffn.{ours}'] = _tensor(
                transform(value) if transform else value)
    if len(set(kinds.values())) > 1:
        raise ValueError('MoE blocks of different kinds or sizes are not '
                         f'supported: {kinds}')
    return state, next(iter(kinds.values()), (None, 0, 0, 0))


def _map_classifier(params: Dict[str, np.ndarray], dense: DenseViT,
                    used: set) -> Tuple[Dict[str, Tensor], str,
                                        Optional[int]]:
    """The pooling (``MapHead``), ``pre_logits`` and ``head`` tensors.

    Returns:
        tuple: the tensors, the classifier ('token', 'gap' or 'map') and
        the ``pre_logits`` width (None without).
    """
    state = {}
    if 'MapHead/probe' in params:
        classifier = 'map'
        state.update(_map_head(params, used))
    else:
        classifier = 'token' if 'cls' in params else 'gap'
    if 'cls' in params and classifier != 'token':
        raise ValueError('a class token with a MapHead is not a V-MoE model')
    representation_size = None
    if 'pre_logits/kernel' in params:
        representation_size = params['pre_logits/kernel'].shape[1]
        state['head.layers.pre_logits.weight'] = _tensor(
            params['pre_logits/kernel'].T)
        state['head.layers.pre_logits.bias'] = _tensor(
            params.get('pre_logits/bias', np.zeros(representation_size)))
        used.update(('pre_logits/kernel', 'pre_logits/bias'))
    state['head.layers.head.weight'] = dense.head['weight']
    state['head.layers.head.bias'] = dense.head['bias']
    return state, classifier, representation_size


def _patch_grid(params: Dict[str, np.ndarray]) -> int:
    """Patches per side of the position embeddings (a square grid)."""
    tokens = params['Encoder/posembed_input/pos_embedding'].shape[1]
    grid = math.isqrt(tokens - ('cls' in params))
    if grid * grid != tokens - ('cls' in params):
        raise ValueError(f'{tokens} position embeddings do not form a '
                         'square patch grid (plus a class token)')
    return grid


def vmoe_to_mmpretrain(
        params: Dict[str, np.ndarray]) -> Tuple[Dict[str, Tensor], VMoEArch]:
    """Map a V-MoE parameter tree to a ``MoEImageClassifier`` state dict.

    Args:
        params (dict): ``{'Encoder/encoderblock_0/...': array}`` as read by
            :func:`read_vmoe_checkpoint`.

    Returns:
        tuple: the state dict (``backbone.*``, ``head.layers.*``) and the
        :class:`VMoEArch` inferred from the shapes.
    """
    _check_classifier(params)
    used = set()
    trunk, moe = _split_trunk_and_moe(params, used)
    patch, in_channels, dims = _patch_embedding(params)
    moe_layers = tuple(sorted(moe))
    state, dense = _map_trunk(trunk, moe_layers)
    moe_state, (moe_type, num_experts, slots,
                expert_hidden) = _map_moe(moe)
    state.update(moe_state)
    head_state, classifier, representation_size = _map_classifier(
        params, dense, used)
    state.update(head_state)
    leftover = sorted(set(params) - used)
    if leftover:
        raise ValueError(f'V-MoE checkpoint parameters with no place in the '
                         f'model (unknown architecture): {leftover}')
    grid = _patch_grid(params)
    dense_blocks = [b for b in range(dense.num_layers) if b not in moe]
    arch = VMoEArch(
        embed_dims=int(dims),
        num_layers=dense.num_layers,
        num_heads=int(dense.num_heads),
        feedforward_channels=int(
            dense.fc(dense_blocks[0])[0].shape[0]
            if dense_blocks else expert_hidden),
        patch_size=int(patch),
        img_size=int(grid * patch),
        in_channels=int(in_channels),
        moe_layers=moe_layers,
        moe_type=moe_type,
        num_experts=int(num_experts),
        slots_per_expert=int(slots),
        expert_hidden=int(expert_hidden),
        classifier=classifier,
        representation_size=(None if representation_size is None else
                             int(representation_size)),
        num_classes=int(state['head.layers.head.weight'].shape[0]))
    return state, arch


def model_config(arch: VMoEArch, **routing) -> dict:
    """The ``model`` config of the converted checkpoint.

    Args:
        arch (VMoEArch): from :func:`vmoe_to_mmpretrain`.
        **routing: sparse MoE routing settings (``top_k``,
            ``capacity_factor``, ``eval_capacity_factor``,
            ``batch_priority``, ``eval_batch_priority``, ``group_size``,
            ``eval_group_size``); those not given take
            :data:`VMOE_ROUTING_DEFAULTS`. Ignored for Soft MoE.

    Returns:
        dict: a ``MoEImageClassifier`` config.
    """
    unknown = set(routing) - set(VMOE_ROUTING_DEFAULTS) - {
        'eval_batch_priority'
    }
    if unknown:
        raise ValueError(f'unknown routing settings {sorted(unknown)}; '
                         f'valid: {sorted(VMOE_ROUTING_DEFAULTS)} and '
                         "'eval_batch_priority'")
    backbone = dict(
        type='VisionMoE',
        arch=dict(
            embed_dims=arch.embed_dims,
            num_layers=arch.num_layers,
            num_heads=arch.num_heads,
            feedforward_channels=arch.feedforward_channels),
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        moe_layers=list(arch.moe_layers),
        act='gelu_tanh',
        out_type=arch.classifier,
        with_cls_token=arch.classifier == 'token')
    if arch.in_channels != 3:
        backbone['in_channels'] = arch.in_channels
    if arch.moe_type == 'sparse':
        options = dict(VMOE_ROUTING_DEFAULTS, **routing)
        moe_cfg = dict(type='SparseMoE', num_experts=arch.num_experts)
        moe_cfg.update(options)
    elif arch.moe_type == 'soft':
        moe_cfg = dict(
            type='SoftMoE',
            num_experts=arch.num_experts,
            slots_per_expert=arch.slots_per_expert)
    else:
        moe_cfg = None
    if moe_cfg is not None:
        if arch.expert_hidden != arch.feedforward_channels:
            moe_cfg['feedforward_channels'] = arch.expert_hidden
        backbone['moe_cfg'] = moe_cfg
    head = dict(
        type='VisionTransformerClsHead',
        num_classes=arch.num_classes,
        in_channels=arch.embed_dims,
        hidden_dim=arch.representation_size,
        # V-MoE trains with sigmoid cross-entropy.
        loss=dict(type='CrossEntropyLoss', use_sigmoid=True),
        topk=(1, 5) if arch.num_classes >= 5 else (1, ))
    return dict(
        type='MoEImageClassifier',
        backbone=backbone,
        neck=None,
        head=head,
        # V-MoE's images are scaled to [-1, 1].
        data_preprocessor=dict(
            num_classes=arch.num_classes,
            mean=[127.5, 127.5, 127.5],
            std=[127.5, 127.5, 127.5],
            to_rgb=True))


def vmoe_test_pipeline(img_size: int) -> list:
    """V-MoE's ImageNet evaluation preprocessing: at 224 px
    ``resize_small(256)|central_crop(224)`` (its from-scratch configs),
    otherwise ``resize(img_size)`` to a square (its 384 px fine-tuning
    configs); bilinear, as ``tf.image.resize``. Pixels go to [-1, 1] in the
    data preprocessor."""
    if img_size == 224:
        resize = [
            dict(
                type='ResizeEdge',
                scale=256,
                edge='short',
                backend='pillow',
                interpolation='bilinear'),
            dict(type='CenterCrop', crop_size=224)
        ]
    else:
        resize = [
            dict(
                type='Resize',
                scale=(img_size, img_size),
                backend='pillow',
                interpolation='bilinear')
        ]
    return [dict(type='LoadImageFromFile'), *resize, dict(type='PackInputs')]


def convert_vmoe(prefix: str, **routing) -> Tuple[Dict[str, Tensor], dict,
                                                  VMoEArch]:
    """Read a V-MoE checkpoint and convert it.

    Args:
        prefix (str): the checkpoint prefix.
        **routing: see :func:`model_config`.

    Returns:
        tuple: the state dict, the ``model`` config and the architecture.
    """
    state, arch = vmoe_to_mmpretrain(read_vmoe_checkpoint(prefix))
    return state, model_config(arch, **routing), arch
