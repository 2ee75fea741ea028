"""V-MoE's released checkpoints into an MMPretrain ``MoEImageClassifier``.

google-research/vmoe saves a model's parameters as ``PREFIX.index`` plus
shards ``PREFIX.data-nnnnn-of-NNNNN``, each one msgpack document in flax's
serialisation format with extension types (vmoe
``vmoe/checkpoints/serialization.py``):

- 1 ndarray ``(shape, dtype name, raw C-order bytes)``, bfloat16 possible;
  3 numpy scalar (same payload); 4 ShapedArray ``(shape, dtype, weak_type,
  {})``; 5 Slice ``(start, stop, step)``; 6 SliceNd (packed Slices);
  8 IndexInfo ``(ShapedArray, SliceNd global_slices, int shards)``. Nested
  payloads are themselves msgpack bytes (or extension values).
- the index: ``{'shard_count': n, 'index': params tree of IndexInfo,
  'version'?}``;
- a shard: ``{'__msgpack_array_chunk_a87ca2__': True, '<leaf id>':
  [[subchunks, global_slice], ...]}``: the 1-D subchunks, concatenated and
  reshaped to the slice's extent, are ``leaf[global_slice]``. The leaf id is
  the leaf's position in the index tree flattened depth-first with the dict
  keys **sorted as strings** (``encoderblock_10`` before ``encoderblock_2``).
  A leaf's chunks may lie in several shards.

:func:`read_vmoe_checkpoint` needs only msgpack and numpy. The parameter
tree (``vmoe/nn/vit_moe.py``) maps to our names as the dense big_vision /
vit_jax ViTs of :mod:`moe_plugin.recycling.formats` do (kernel ``(D, H, Dh)``
reshaped and transposed into one ``qkv`` weight, Dense kernels transposed,
LayerNorm ``scale`` as ``weight``, the patch kernel ``(p, p, 3, D)`` as
``(D, 3, p, p)``), plus the MoE blocks (sparse: ``Moe/Router/dense/kernel``
``(D, E)`` and stacked experts ``Moe/Mlp/Dense_0/kernel`` ``(E, D, F)``;
Soft MoE: ``Moe/Router/{mu, scale}``), the ``token`` / ``gap`` / ``map``
heads (``MapHead`` into timm's ``AttentionPoolLatent``), ``pre_logits``
(Dense + tanh, MMPretrain's ``VisionTransformerClsHead(hidden_dim=...)``)
and ``head``. :func:`vmoe_to_mmpretrain` infers the architecture from the
shapes; :func:`model_config` writes the ``model`` config.
"""
import math
import os.path as osp
import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

CHUNKS_MAGIC_KEY = '__msgpack_array_chunk_a87ca2__'
EXT_NDARRAY, EXT_NPSCALAR, EXT_SHAPED_ARRAY = 1, 3, 4
EXT_SLICE, EXT_SLICE_ND, EXT_INDEX_INFO = 5, 6, 8

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


def _msgpack():
    try:
        import msgpack
    except ImportError as error:
        raise ImportError(
            'reading V-MoE checkpoints needs `msgpack`: pip install '
            "'moe_plugin[convert]' (or pip install msgpack)") from error
    return msgpack


# --- reading -----------------------------------------------------------------
class IndexInfo(NamedTuple):
    """Where a leaf's pieces are: its global shape and dtype, and for each
    piece its global slice (a tuple of ``slice``) and the shard holding it."""
    shape: Tuple[int, ...]
    dtype: str
    global_slices: Tuple[Tuple[slice, ...], ...]
    shards: Tuple[int, ...]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unpack_payload(value):
    """A nested payload: msgpack bytes, or an already decoded value."""
    msgpack = _msgpack()
    if isinstance(value, bytes):
        return msgpack.unpackb(value, raw=True, ext_hook=_ext_hook)
    if isinstance(value, msgpack.ExtType):
        return _ext_hook(value.code, value.data)
    return value


def _ndarray(data: bytes) -> np.ndarray:
    """flax's ndarray payload; bfloat16 becomes float32 (exactly)."""
    shape, dtype, buffer = _msgpack().unpackb(data, raw=True)
    dtype = _text(dtype)
    if dtype == 'bfloat16':
        bits = np.frombuffer(buffer, dtype='<u2').astype(np.uint32) << 16
        array = bits.view(np.float32)
    else:
        array = np.frombuffer(buffer, dtype=np.dtype(dtype))
    return array.reshape(tuple(shape), order='C')


def _slice(value) -> slice:
    start, stop, step = _unpack_payload(value)
    return slice(start, stop, step)


def _slice_nd(value) -> Tuple[slice, ...]:
    value = _unpack_payload(value)
    if isinstance(value, tuple) and all(isinstance(s, slice) for s in value):
        return value
    return tuple(_slice(s) for s in value)


def _shaped_array(value) -> Tuple[Tuple[int, ...], str]:
    value = _unpack_payload(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(
            value[1], str):
        return value
    shape, dtype = value[0], value[1]
    return tuple(int(s) for s in shape), _text(dtype)


def _ext_hook(code: int, data: bytes):
    """Decode vmoe's msgpack extension types."""
    if code == EXT_NDARRAY:
        return _ndarray(data)
    if code == EXT_NPSCALAR:
        return _ndarray(data)[()]
    if code == EXT_SHAPED_ARRAY:
        return _shaped_array(data)
    if code == EXT_SLICE:
        return _slice(data)
    if code == EXT_SLICE_ND:
        return _slice_nd(data)
    if code == EXT_INDEX_INFO:
        shaped, slices, shards = _msgpack().unpackb(data, raw=True)
        shape, dtype = _shaped_array(shaped)
        return IndexInfo(shape, dtype, tuple(_slice_nd(s) for s in slices),
                         tuple(int(s) for s in shards))
    raise ValueError(f'unknown msgpack extension type {code} in a V-MoE '
                     'checkpoint')


def _unpack_file(path: str, what: str):
    msgpack = _msgpack()
    with open(path, 'rb') as f:
        data = f.read()
    try:
        return msgpack.unpackb(
            data, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    except (ValueError, TypeError, msgpack.exceptions.UnpackException,
            msgpack.exceptions.ExtraData) as error:
        raise ValueError(f'cannot read the V-MoE {what} {path!r} (truncated '
                         f'or not a V-MoE checkpoint?): {error}') from error


def flatten_tree(tree, prefix: str = '') -> List[Tuple[str, Any]]:
    """Leaves of a nested dict depth-first, keys sorted as strings (jax's
    and vmoe's order), as ``('a/b/c', leaf)``."""
    if not isinstance(tree, dict):
        return [(prefix, tree)]
    leaves = []
    for key in sorted(tree, key=_text):
        name = f'{prefix}/{_text(key)}' if prefix else _text(key)
        leaves.extend(flatten_tree(tree[key], name))
    return leaves


def shard_path(prefix: str, shard: int, shard_count: int) -> str:
    """``PREFIX.data-nnnnn-of-NNNNN`` (vmoe's ``add_shard_suffix``)."""
    return f'{prefix}.data-{shard:05d}-of-{shard_count:05d}'


def read_vmoe_index(prefix: str) -> Tuple[int, List[Tuple[str, IndexInfo]]]:
    """Read ``PREFIX.index``.

    Args:
        prefix (str): checkpoint prefix.

    Returns:
        tuple: the shard count and ``(name, IndexInfo)`` per leaf, in leaf-id
        order.
    """
    path = prefix + '.index'
    if not osp.isfile(path):
        raise FileNotFoundError(f'V-MoE index {path!r} does not exist (give '
                                'the prefix, without .index)')
    index = _unpack_file(path, 'index')
    if not isinstance(index, dict) or 'index' not in index or \
            'shard_count' not in index:
        raise ValueError(f'{path!r} is not a V-MoE index: expected the keys '
                         "'shard_count' and 'index'")
    shard_count = int(index['shard_count'])
    leaves = flatten_tree(index['index'])
    for name, info in leaves:
        if not isinstance(info, IndexInfo):
            raise ValueError(f'{path!r}: leaf {name!r} is not an IndexInfo')
        if len(info.global_slices) != len(info.shards):
            raise ValueError(f'{path!r}: leaf {name!r} has '
                             f'{len(info.global_slices)} slices for '
                             f'{len(info.shards)} shards')
        for shard in info.shards:
            if not 0 <= shard < shard_count:
                raise ValueError(
                    f'{path!r}: leaf {name!r} is in shard {shard}, but the '
                    f'checkpoint has {shard_count} shards')
    return shard_count, leaves


def _normal_slices(slices: Tuple[slice, ...],
                   shape: Tuple[int, ...]) -> Tuple[slice, ...]:
    return tuple(
        slice(s.start or 0, size if s.stop is None else s.stop, s.step)
        for s, size in zip(slices, shape))


def read_vmoe_checkpoint(prefix: str) -> Dict[str, np.ndarray]:
    """Read a V-MoE checkpoint into ``{'a/b/kernel': float32 array}``.

    Args:
        prefix (str): ``PREFIX`` of ``PREFIX.index`` and
            ``PREFIX.data-nnnnn-of-NNNNN``.

    Returns:
        dict: every leaf, floats as float32 (bfloat16 converted exactly),
        other dtypes as stored.
    """
    shard_count, leaves = read_vmoe_index(prefix)
    needed = sorted({s for _, info in leaves for s in info.shards})
    missing = [
        shard_path(prefix, s, shard_count) for s in needed
        if not osp.isfile(shard_path(prefix, s, shard_count))
    ]
    if missing:
        raise FileNotFoundError(f'V-MoE checkpoint {prefix!r}: the index '
                                f'names shards that do not exist: {missing}')
    arrays = []
    for name, info in leaves:
        floating = info.dtype in ('bfloat16', 'float16', 'float32', 'float64')
        arrays.append(
            np.zeros(info.shape,
                     dtype=np.float32 if floating else np.dtype(info.dtype)))
    expected = {(leaf_id, _slice_key(_normal_slices(slices, info.shape)),
                 shard)
                for leaf_id, (_, info) in enumerate(leaves)
                for slices, shard in zip(info.global_slices, info.shards)}
    found = set()
    for shard in needed:
        path = shard_path(prefix, shard, shard_count)
        content = _unpack_file(path, 'shard')
        if not isinstance(content, dict) or not content.get(
                CHUNKS_MAGIC_KEY):
            raise ValueError(f'{path!r} is not a V-MoE checkpoint shard (no '
                             f'{CHUNKS_MAGIC_KEY!r} key)')
        for leaf_key, chunks in content.items():
            if leaf_key == CHUNKS_MAGIC_KEY:
                continue
            leaf_id = int(leaf_key)
            if not 0 <= leaf_id < len(leaves):
                raise ValueError(f'{path!r} holds leaf {leaf_id}, but the '
                                 f'index has {len(leaves)} leaves')
            name, info = leaves[leaf_id]
            for subchunks, global_slice in chunks:
                slices = _normal_slices(_slice_nd(global_slice), info.shape)
                extent = tuple(
                    len(range(s.start, s.stop, s.step or 1)) for s in slices)
                flat = (np.concatenate([np.asarray(c).reshape(-1)
                                        for c in subchunks])
                        if subchunks else np.zeros(0))
                if flat.size != math.prod(extent):
                    raise ValueError(
                        f'{path!r}: leaf {name!r} slice {slices} holds '
                        f'{flat.size} values for extent {extent}')
                arrays[leaf_id][slices] = flat.reshape(extent)
                found.add((leaf_id, _slice_key(slices), shard))
    absent = expected - found
    if absent:
        names = sorted({leaves[leaf_id][0] for leaf_id, _, _ in absent})
        raise ValueError(f'V-MoE checkpoint {prefix!r}: pieces of {names} '
                         'named by the index are not in their shards')
    return {name: array for (name, _), array in zip(leaves, arrays)}


def _slice_key(slices: Tuple[slice, ...]) -> Tuple[Tuple, ...]:
    return tuple((s.start, s.stop, s.step) for s in slices)


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
    from moe_plugin.recycling.formats import big_vision_to_canonical
    for key in ('embedding/kernel', 'Encoder/posembed_input/pos_embedding',
                'head/kernel'):
        if key not in params:
            raise ValueError(
                f'not a V-MoE ViT classifier (unknown architecture): no '
                f'{key!r} (learned position embeddings and a head are '
                f'required); its keys include {sorted(params)[:8]}')
    trunk, moe, used = {}, {}, set()
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

    kernel = params['embedding/kernel']
    patch, _, in_channels, dims = kernel.shape
    if kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f'embedding/kernel {kernel.shape}: only square '
                         'patches are supported')
    # The canonical reader wants a dense MLP in every block: MoE blocks get a
    # placeholder of width 1 whose converted tensors are dropped below.
    for block in moe:
        name = f'Transformer/encoderblock_{block}/MlpBlock_0/'
        trunk.update({
            name + 'Dense_0/kernel': np.zeros((dims, 1), np.float32),
            name + 'Dense_0/bias': np.zeros(1, np.float32),
            name + 'Dense_1/kernel': np.zeros((1, dims), np.float32),
            name + 'Dense_1/bias': np.zeros(dims, np.float32)
        })
    dense = big_vision_to_canonical(trunk)
    state = {
        'backbone.' + key: value
        for key, value in dense.state.items()
        if not (key.startswith('layers.') and int(key.split('.')[1]) in moe
                and '.ffn.' in key)
    }
    num_layers = dense.num_layers
    moe_layers = tuple(sorted(moe))
    bad = [block for block in moe_layers if block >= num_layers]
    if bad:
        raise ValueError(f'MoE blocks {bad} lie beyond the {num_layers} '
                         'encoder blocks')

    kinds = {}
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
    moe_type, num_experts, slots, expert_hidden = next(
        iter(kinds.values()), (None, 0, 0, 0))

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

    leftover = sorted(set(params) - used)
    if leftover:
        raise ValueError(f'V-MoE checkpoint parameters with no place in the '
                         f'model (unknown architecture): {leftover}')
    tokens = params['Encoder/posembed_input/pos_embedding'].shape[1]
    grid = math.isqrt(tokens - ('cls' in params))
    if grid * grid != tokens - ('cls' in params):
        raise ValueError(f'{tokens} position embeddings do not form a '
                         'square patch grid (plus a class token)')
    dense_blocks = [b for b in range(num_layers) if b not in moe]
    arch = VMoEArch(
        embed_dims=int(dims),
        num_layers=num_layers,
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
