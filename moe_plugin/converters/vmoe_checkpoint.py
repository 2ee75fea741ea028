"""Read V-MoE's released checkpoints: ``PREFIX.index`` and its shards.

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

:func:`read_vmoe_checkpoint` needs only msgpack and numpy (as vmoe keeps
``checkpoints/`` apart from ``nn/``, the key mapping is
:mod:`moe_plugin.converters.vmoe`).
"""
import math
import os.path as osp
from typing import Any, Dict, List, NamedTuple, Tuple

import numpy as np

CHUNKS_MAGIC_KEY = '__msgpack_array_chunk_a87ca2__'
EXT_NDARRAY, EXT_NPSCALAR, EXT_SHAPED_ARRAY = 1, 3, 4
EXT_SLICE, EXT_SLICE_ND, EXT_INDEX_INFO = 5, 6, 8


def _msgpack():
    try:
        import msgpack
    except ImportError as error:
        raise ImportError(
            'reading V-MoE checkpoints needs `msgpack`: pip install '
            "'moe_plugin[convert]' (or pip install msgpack)") from error
    return msgpack


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
