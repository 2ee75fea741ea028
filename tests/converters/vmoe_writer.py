"""Write V-MoE checkpoints (spec 04) and run V-MoE's forward, slowly.

The writer follows vmoe's format by hand (``vmoe/checkpoints``): msgpack
documents with extension types, nested payloads packed as msgpack bytes,
leaf ids from the tree flattened with keys sorted as strings, chunks split
into 1-D subchunks, a leaf's pieces possibly in several shards.

The reference forward is written from V-MoE's equations on the flax tree
itself (kernels ``(D, H, Dh)``, ``(E, D, F)`` ...), in float64, with plain
loops for the routing: top-K by a stable sort (ties to the lower expert),
choice-major slots, BPR as a stable sort by the largest gate, capacity
``ceil(S * K * c / E)`` rounded up to a multiple of 4, drops.
"""
import math

import msgpack
import numpy as np
import torch

MAGIC = '__msgpack_array_chunk_a87ca2__'

#: 12 blocks: encoderblock_10 and _11 sort before _2 as strings.
SPARSE = dict(depth=12, moe_blocks=(2, 10, 11), classifier='token')
BF16 = ('Encoder/encoderblock_10/SelfAttention/query/kernel',
        'Encoder/encoderblock_2/Moe/Mlp/Dense_1/kernel', 'head/kernel',
        'Encoder/posembed_input/pos_embedding')
SPLIT = ('Encoder/encoderblock_10/Moe/Mlp/Dense_0/kernel',
         'Encoder/encoderblock_3/Mlp/Dense_1/kernel')


# --- writer ------------------------------------------------------------------
def _pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _ndarray_ext(array: np.ndarray, dtype: str) -> msgpack.ExtType:
    if dtype == 'bfloat16':
        raw = torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(
            torch.bfloat16).view(torch.int16).numpy().tobytes()
    else:
        raw = np.ascontiguousarray(array, dtype).tobytes()
    return msgpack.ExtType(1, _pack((list(array.shape), dtype, raw)))


def _slice_bytes(s: slice) -> bytes:
    return _pack((s.start, s.stop, s.step))


def _slice_nd_bytes(slices) -> bytes:
    return _pack(tuple(_slice_bytes(s) for s in slices))


def bf16_round(array: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 stores them (round to nearest even)."""
    return torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(
        torch.bfloat16).float().numpy()


def flatten(tree, prefix=''):
    if not isinstance(tree, dict):
        return [(prefix, tree)]
    out = []
    for key in sorted(tree):  # string order: encoderblock_10 < _2
        out += flatten(tree[key], f'{prefix}/{key}' if prefix else key)
    return out


def nest(flat):
    tree = {}
    for name, value in flat.items():
        node = tree
        parts = name.split('/')
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def write_vmoe_checkpoint(prefix, params, num_shards=2, bf16=(),
                          split=(), subchunk=7, shard_count=None,
                          version=True, split_pieces=2):
    """Write ``params`` (``{'a/b': float32 array}``) as a V-MoE checkpoint.

    Args:
        bf16: names stored as bfloat16.
        split: names cut along axis 0 into ``split_pieces`` pieces, piece
            ``j`` in shard ``j % num_shards`` (3 pieces in 2 shards: shard 0
            holds two pieces of the leaf).
        subchunk: values per 1-D subchunk.
        shard_count: written in the index (default ``num_shards``).

    Returns:
        dict: the values as a reader must return them (bf16-rounded).
    """
    flat = flatten(nest(params))
    shards = [{MAGIC: True} for _ in range(num_shards)]
    index, expected = {}, {}
    for leaf_id, (name, array) in enumerate(flat):
        array = np.asarray(array, np.float32)
        dtype = 'bfloat16' if name in bf16 else 'float32'
        expected[name] = bf16_round(array) if dtype == 'bfloat16' else array
        full = [slice(0, n, None) for n in array.shape]
        if name in split:
            bounds = np.linspace(0, array.shape[0], split_pieces + 1).astype(
                int).tolist()
            pieces = [([slice(start, stop, None)] + full[1:], j % num_shards)
                      for j, (start, stop) in enumerate(
                          zip(bounds[:-1], bounds[1:]))]
        else:
            pieces = [(full, leaf_id % num_shards)]
        for slices, shard in pieces:
            chunk = array[tuple(slices)].reshape(-1)
            subchunks = [
                _ndarray_ext(chunk[i:i + subchunk], dtype)
                for i in range(0, max(chunk.size, 1), subchunk)
            ] if chunk.size else []
            shards[shard].setdefault(str(leaf_id), []).append(
                [subchunks, msgpack.ExtType(6, _slice_nd_bytes(slices))])
        shaped = _pack((list(array.shape), dtype, False, {}))
        info = _pack((shaped, tuple(_slice_nd_bytes(s) for s, _ in pieces),
                      tuple(shard for _, shard in pieces)))
        node = index
        parts = name.split('/')
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = msgpack.ExtType(8, info)
    count = num_shards if shard_count is None else shard_count
    document = {'shard_count': count, 'index': index}
    if version:
        document['version'] = '20220622'
    with open(prefix + '.index', 'wb') as f:
        f.write(_pack(document))
    for shard, content in enumerate(shards):
        with open(f'{prefix}.data-{shard:05d}-of-{count:05d}', 'wb') as f:
            f.write(_pack(content))
    return expected


# --- parameters --------------------------------------------------------------
def write(tmp_path, params, name='ckpt', **kwargs):
    """:func:`write_vmoe_checkpoint` to ``tmp_path / name``: the prefix and
    the arrays as stored."""
    prefix = str(tmp_path / name)
    expected = write_vmoe_checkpoint(prefix, params, **kwargs)
    return prefix, expected


def make_params(seed, dims=32, depth=4, heads=2, mlp=64, patch=4, img=16,
                classes=10, moe_blocks=(1, 3), kind='sparse', experts=4,
                slots=2, classifier='token', representation=None):
    """Random parameters of a V-MoE ViT in vmoe's tree layout."""
    rng = np.random.RandomState(seed)

    def normal(*shape, std=None):
        std = 1.0 / math.sqrt(shape[0]) if std is None else std
        return rng.normal(0, std, shape).astype(np.float32)

    head_dim = dims // heads
    tokens = (img // patch)**2 + (classifier == 'token')
    p = {
        'embedding/kernel': normal(patch, patch, 3, dims, std=0.1),
        'embedding/bias': normal(dims, std=0.1),
        'Encoder/posembed_input/pos_embedding': normal(1, tokens, dims,
                                                       std=0.2),
        'Encoder/encoder_norm/scale': 1 + normal(dims, std=0.1),
        'Encoder/encoder_norm/bias': normal(dims, std=0.1),
    }
    if classifier == 'token':
        p['cls'] = normal(1, 1, dims, std=0.5)
    for i in range(depth):
        b = f'Encoder/encoderblock_{i}/'
        for ln in ('LayerNorm_0', 'LayerNorm_1'):
            p[b + ln + '/scale'] = 1 + normal(dims, std=0.1)
            p[b + ln + '/bias'] = normal(dims, std=0.1)
        for name in ('query', 'key', 'value'):
            p[b + f'SelfAttention/{name}/kernel'] = normal(dims, heads,
                                                           head_dim)
            p[b + f'SelfAttention/{name}/bias'] = normal(heads, head_dim,
                                                         std=0.1)
        p[b + 'SelfAttention/out/kernel'] = normal(heads, head_dim, dims,
                                                   std=dims**-0.5)
        p[b + 'SelfAttention/out/bias'] = normal(dims, std=0.1)
        if i in moe_blocks:
            if kind == 'sparse':
                p[b + 'Moe/Router/dense/kernel'] = normal(dims, experts,
                                                          std=1.0)
            else:
                p[b + 'Moe/Router/mu'] = normal(dims, experts, slots)
                p[b + 'Moe/Router/scale'] = np.array(3.0, np.float32)
            p[b + 'Moe/Mlp/Dense_0/kernel'] = normal(experts, dims, mlp,
                                                     std=dims**-0.5)
            p[b + 'Moe/Mlp/Dense_0/bias'] = normal(experts, mlp, std=0.1)
            p[b + 'Moe/Mlp/Dense_1/kernel'] = normal(experts, mlp, dims,
                                                     std=mlp**-0.5)
            p[b + 'Moe/Mlp/Dense_1/bias'] = normal(experts, dims, std=0.1)
        else:
            p[b + 'Mlp/Dense_0/kernel'] = normal(dims, mlp)
            p[b + 'Mlp/Dense_0/bias'] = normal(mlp, std=0.1)
            p[b + 'Mlp/Dense_1/kernel'] = normal(mlp, dims)
            p[b + 'Mlp/Dense_1/bias'] = normal(dims, std=0.1)
    if classifier == 'map':
        m = 'MapHead/'
        p[m + 'probe'] = normal(1, 1, dims, std=0.5)
        for name in ('query', 'key', 'value'):
            p[m + f'MultiHeadDotProductAttention/{name}/kernel'] = normal(
                dims, heads, head_dim)
            p[m + f'MultiHeadDotProductAttention/{name}/bias'] = normal(
                heads, head_dim, std=0.1)
        p[m + 'MultiHeadDotProductAttention/out/kernel'] = normal(
            heads, head_dim, dims, std=dims**-0.5)
        p[m + 'MultiHeadDotProductAttention/out/bias'] = normal(dims,
                                                                std=0.1)
        p[m + 'LayerNorm/scale'] = 1 + normal(dims, std=0.1)
        p[m + 'LayerNorm/bias'] = normal(dims, std=0.1)
        p[m + 'Mlp/Dense_0/kernel'] = normal(dims, mlp)
        p[m + 'Mlp/Dense_0/bias'] = normal(mlp, std=0.1)
        p[m + 'Mlp/Dense_1/kernel'] = normal(mlp, dims)
        p[m + 'Mlp/Dense_1/bias'] = normal(dims, std=0.1)
    width = dims
    if representation:
        p['pre_logits/kernel'] = normal(dims, representation)
        p['pre_logits/bias'] = normal(representation, std=0.1)
        width = representation
    p['head/kernel'] = normal(width, classes)
    p['head/bias'] = normal(classes, std=0.1)
    return p


# --- reference forward -------------------------------------------------------
def gelu_tanh(x):
    inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1 + np.tanh(inner))


def layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean)**2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def attention(p, prefix, q_in, kv_in):
    """flax MultiHeadDotProductAttention: ``[N, D]`` queries and keys."""
    q = np.einsum('nd,dhk->nhk', q_in, p[prefix + 'query/kernel']) + \
        p[prefix + 'query/bias']
    k = np.einsum('nd,dhk->nhk', kv_in, p[prefix + 'key/kernel']) + \
        p[prefix + 'key/bias']
    v = np.einsum('nd,dhk->nhk', kv_in, p[prefix + 'value/kernel']) + \
        p[prefix + 'value/bias']
    weights = softmax(np.einsum('qhk,nhk->hqn', q, k) / math.sqrt(q.shape[-1]))
    out = np.einsum('hqn,nhk->qhk', weights, v)
    return np.einsum('qhk,hkd->qd', out, p[prefix + 'out/kernel']) + \
        p[prefix + 'out/bias']


def mlp(p, prefix, x, expert=None):
    w0, b0 = p[prefix + 'Dense_0/kernel'], p[prefix + 'Dense_0/bias']
    w1, b1 = p[prefix + 'Dense_1/kernel'], p[prefix + 'Dense_1/bias']
    if expert is not None:
        w0, b0, w1, b1 = w0[expert], b0[expert], w1[expert], b1[expert]
    return gelu_tanh(x @ w0 + b0) @ w1 + b1


def sparse_moe(p, prefix, group, top_k, capacity_factor, bpr):
    """One group ``[S, D]`` through a V-MoE layer, one pair at a time."""
    tokens = group.shape[0]
    gates = softmax(group @ p[prefix + 'Router/dense/kernel'])
    experts = gates.shape[1]
    capacity = math.ceil(tokens * top_k * capacity_factor / experts)
    capacity += (-capacity) % 4
    choices = [
        sorted(range(experts), key=lambda e: -gates[s, e])[:top_k]
        for s in range(tokens)
    ]
    order = list(range(tokens))
    if bpr:
        order.sort(key=lambda s: -gates[s].max())
    out = np.zeros_like(group)
    filled = [0] * experts
    for k in range(top_k):
        for s in order:
            e = choices[s][k]
            if filled[e] < capacity:
                out[s] += gates[s, e] * mlp(p, prefix + 'Mlp/', group[s], e)
            filled[e] += 1
    return out


def soft_moe(p, prefix, x):
    """One image ``[N, D]`` through a Soft MoE layer."""
    mu = p[prefix + 'Router/mu']
    keys = x / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-6)
    mu = mu / np.sqrt((mu**2).sum(0, keepdims=True) + 1e-6)
    logits = p[prefix + 'Router/scale'] * np.einsum('nd,dep->nep', keys, mu)
    dispatch = softmax(logits, 0)
    n, e, s = logits.shape
    combine = softmax(logits.reshape(n, e * s), -1).reshape(n, e, s)
    slots = np.einsum('nep,nd->epd', dispatch, x)
    outs = np.stack([mlp(p, prefix + 'Mlp/', slots[i], i) for i in range(e)])
    return np.einsum('nep,epd->nd', combine, outs)


def vmoe_forward(params, images, top_k=2, capacity_factor=1.05,
                 group_images=1, bpr=False):
    """V-MoE's logits for ``images`` ``[B, 3, H, W]`` (float64)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = images.permute(0, 2, 3, 1).double().numpy()  # flax is NHWC
    kernel = p['embedding/kernel']
    patch, dims = kernel.shape[0], kernel.shape[-1]
    b, h, w, c = x.shape
    patches = x.reshape(b, h // patch, patch, w // patch, patch, c)
    x = np.einsum('bipjqc,pqcd->bijd', patches, kernel) + p['embedding/bias']
    x = x.reshape(b, -1, dims)
    if 'cls' in p:
        x = np.concatenate([np.repeat(p['cls'], b, 0), x], 1)
    x = x + p['Encoder/posembed_input/pos_embedding']
    depth = len({
        k.split('/')[1]
        for k in p if k.startswith('Encoder/encoderblock_')
    })
    for i in range(depth):
        blk = f'Encoder/encoderblock_{i}/'
        y = layer_norm(x, p[blk + 'LayerNorm_0/scale'],
                       p[blk + 'LayerNorm_0/bias'])
        x = x + np.stack(
            [attention(p, blk + 'SelfAttention/', t, t) for t in y])
        y = layer_norm(x, p[blk + 'LayerNorm_1/scale'],
                       p[blk + 'LayerNorm_1/bias'])
        if blk + 'Moe/Router/dense/kernel' in p:
            groups = y.reshape(b // group_images, -1, dims)
            out = np.stack([
                sparse_moe(p, blk + 'Moe/', g, top_k, capacity_factor, bpr)
                for g in groups
            ]).reshape(y.shape)
        elif blk + 'Moe/Router/mu' in p:
            out = np.stack([soft_moe(p, blk + 'Moe/', t) for t in y])
        else:
            out = mlp(p, blk + 'Mlp/', y)
        x = x + out
    x = layer_norm(x, p['Encoder/encoder_norm/scale'],
                   p['Encoder/encoder_norm/bias'])
    if 'cls' in p:
        x = x[:, 0]
    elif 'MapHead/probe' in p:
        pooled = []
        for t in x:
            z = attention(p, 'MapHead/MultiHeadDotProductAttention/',
                          p['MapHead/probe'][0], t)
            z = z + mlp(
                p, 'MapHead/Mlp/',
                layer_norm(z, p['MapHead/LayerNorm/scale'],
                           p['MapHead/LayerNorm/bias']))
            pooled.append(z[0])
        x = np.stack(pooled)
    else:
        x = x.mean(1)
    if 'pre_logits/kernel' in p:
        x = np.tanh(x @ p['pre_logits/kernel'] + p['pre_logits/bias'])
    return torch.from_numpy(x @ p['head/kernel'] + p['head/bias'])
