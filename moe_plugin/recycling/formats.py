"""Read dense ViT checkpoints into one canonical form.

The canonical form is MMPretrain's ``VisionTransformer`` state dict without
prefix (``patch_embed.projection.weight``, ``layers.{i}.attn.qkv.weight``,
``layers.{i}.ffn.layers.0.0.weight`` (fc1), ``layers.{i}.ffn.layers.1.weight``
(fc2), ``ln1.weight`` (final norm) or ``ln2.weight`` (timm's ``fc_norm``) …)
plus the classifier as ``head.weight`` / ``head.bias``. Readers:

- timm ``.pth`` / ``.bin`` / ``.safetensors`` (``blocks.{i}.mlp.fc1`` …, bare
  or under ``model.`` / ``state_dict``);
- big_vision and vit_jax ``.npz`` (``Transformer/encoderblock_{i}/…``,
  ``params/`` or ``opt/target/`` prefixes, scanned ``encoderblock`` stacks);
- MMPretrain ``.pth`` (bare, under ``state_dict``, ``backbone.``-prefixed or
  not; a run checkpoint of ``tools/train.py`` loads through the scoped
  allow-list of :mod:`moe_plugin.compat`).

Everything loads with ``torch.load(weights_only=True)``.
"""
import hashlib
import os.path as osp
import pickle
import re
import zipfile
from typing import Dict, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

FORMATS = ('timm', 'big_vision', 'mmpretrain')


class DenseViT(NamedTuple):
    """A dense ViT checkpoint in canonical form.

    Attributes:
        state (dict): canonical backbone tensors (see the module docstring).
        head (dict): ``weight`` ``[C, D]`` and ``bias`` ``[C]``, or empty.
        fmt (str): the detected (or forced) source format.
        num_heads (int, optional): attention heads, when the format stores
            them (big_vision's ``[D, heads, head_dim]`` kernels).
    """
    state: Dict[str, Tensor]
    head: Dict[str, Tensor]
    fmt: str
    num_heads: Optional[int] = None

    @property
    def embed_dims(self) -> int:
        return self.state['patch_embed.projection.weight'].shape[0]

    @property
    def num_layers(self) -> int:
        return 1 + max(
            int(k.split('.')[1]) for k in self.state
            if k.startswith('layers.'))

    @property
    def patch_size(self) -> int:
        return self.state['patch_embed.projection.weight'].shape[-1]

    @property
    def in_channels(self) -> int:
        """Image channels of the patch embedding (1 for grey images)."""
        return self.state['patch_embed.projection.weight'].shape[1]

    @property
    def feedforward_channels(self) -> int:
        return self.state['layers.0.ffn.layers.0.0.weight'].shape[0]

    def fc(self, block: int):
        """``(fc1.weight [H, D], fc1.bias [H], fc2.weight [D, H],
        fc2.bias [D])`` of block ``block``."""
        prefix = f'layers.{block}.ffn.layers.'
        return (self.state[prefix + '0.0.weight'],
                self.state[prefix + '0.0.bias'],
                self.state[prefix + '1.weight'], self.state[prefix + '1.bias'])


def sha256(path: str) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


# --- timm ------------------------------------------------------------------
_TIMM_RULES = [
    (r'^patch_embed\.proj\.', 'patch_embed.projection.'),
    (r'^blocks\.(\d+)\.norm1\.', r'layers.\1.ln1.'),
    (r'^blocks\.(\d+)\.norm2\.', r'layers.\1.ln2.'),
    (r'^blocks\.(\d+)\.attn\.', r'layers.\1.attn.'),
    (r'^blocks\.(\d+)\.mlp\.fc1\.', r'layers.\1.ffn.layers.0.0.'),
    (r'^blocks\.(\d+)\.mlp\.fc2\.', r'layers.\1.ffn.layers.1.'),
    (r'^norm\.', 'ln1.'),
    (r'^fc_norm\.', 'ln2.'),
    (r'^(cls_token|pos_embed)$', r'\1'),
]


def timm_to_canonical(state: Dict[str, Tensor]) -> DenseViT:
    """timm ``VisionTransformer`` keys to the canonical form."""
    out, head = {}, {}
    for key, value in state.items():
        if key in ('head.weight', 'head.bias'):
            head[key.split('.')[1]] = value
            continue
        for pattern, replacement in _TIMM_RULES:
            if re.match(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise ValueError(f'timm checkpoint key {key!r} has no place in '
                             'a plain ViT (unsupported variant)')
    return DenseViT(out, head, 'timm')


# --- MMPretrain ------------------------------------------------------------
def mmpretrain_to_canonical(state: Dict[str, Tensor]) -> DenseViT:
    """MMPretrain ``ImageClassifier`` / ``VisionTransformer`` keys."""
    out, head = {}, {}
    for key, value in state.items():
        if key.startswith('data_preprocessor.'):
            continue
        if key.startswith('head.'):
            name = key.split('.')[-1]
            if key in ('head.fc.weight', 'head.fc.bias',
                       'head.layers.head.weight', 'head.layers.head.bias'):
                head[name] = value
            continue
        out[key[len('backbone.'):] if key.startswith('backbone.') else
            key] = value
    return DenseViT(out, head, 'mmpretrain')


# --- big_vision / vit_jax ---------------------------------------------------
def _dense(kernel: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.T))


def big_vision_to_canonical(arrays: Dict[str, np.ndarray],
                            blocks_without_mlp: Sequence[int] = ()
                            ) -> DenseViT:
    """big_vision / vit_jax ``.npz`` arrays to the canonical form.

    Args:
        arrays (dict): ``{'Transformer/encoderblock_0/...': array}``.
        blocks_without_mlp (Sequence[int]): 0-based blocks that hold no
            ``MlpBlock`` (e.g. V-MoE's MoE blocks); their ``ffn`` tensors are
            left out. Defaults to ().

    Returns:
        DenseViT: the canonical checkpoint.
    """
    prefix = ''
    for candidate in ('params/', 'opt/target/', 'params/img/'):
        if candidate + 'embedding/kernel' in arrays:
            prefix = candidate
    if prefix + 'embedding/kernel' not in arrays:
        raise ValueError('not a ViT .npz: no embedding/kernel array')

    def get(name, index=None):
        key = prefix + name
        if key not in arrays:
            raise ValueError(f'.npz checkpoint lacks {key!r}')
        value = np.asarray(arrays[key], dtype=np.float32)
        return value if index is None else value[index]

    scanned = prefix + 'Transformer/encoderblock/LayerNorm_0/scale' in arrays
    big_vision = scanned or prefix + 'pos_embedding' in arrays
    mha, mlp, ln2 = ((0, 0, 1) if big_vision else (1, 3, 2))
    state = {
        'patch_embed.projection.weight':
        torch.from_numpy(get('embedding/kernel').transpose(3, 2, 0, 1).copy()),
        'patch_embed.projection.bias':
        torch.from_numpy(get('embedding/bias')),
        'pos_embed':
        torch.from_numpy(
            get('pos_embedding' if big_vision else
                'Transformer/posembed_input/pos_embedding')),
    }
    if prefix + 'cls' in arrays:
        state['cls_token'] = torch.from_numpy(get('cls'))
    if scanned:
        depth = arrays[prefix +
                       'Transformer/encoderblock/LayerNorm_0/scale'].shape[0]
    else:
        depth = len({
            m.group(1)
            for m in (re.match(re.escape(prefix) +
                               r'Transformer/encoderblock_(\d+)/', k)
                      for k in arrays) if m
        })
    num_heads = None
    for i in range(depth):
        block, index = (('Transformer/encoderblock/', i) if scanned else
                        (f'Transformer/encoderblock_{i}/', None))
        attn = f'{block}MultiHeadDotProductAttention_{mha}/'
        q, k, v = (get(f'{attn}{n}/kernel', index)
                   for n in ('query', 'key', 'value'))
        num_heads = q.shape[1]
        state[f'layers.{i}.attn.qkv.weight'] = torch.cat([
            torch.from_numpy(w.reshape(w.shape[0], -1).T.copy())
            for w in (q, k, v)
        ])
        state[f'layers.{i}.attn.qkv.bias'] = torch.cat([
            torch.from_numpy(get(f'{attn}{n}/bias', index).reshape(-1))
            for n in ('query', 'key', 'value')
        ])
        out = get(f'{attn}out/kernel', index)
        state[f'layers.{i}.attn.proj.weight'] = torch.from_numpy(
            out.reshape(-1, out.shape[-1]).T.copy())
        state[f'layers.{i}.attn.proj.bias'] = torch.from_numpy(
            get(f'{attn}out/bias', index))
        for ours, theirs in (('ln1', 'LayerNorm_0'), ('ln2',
                                                      f'LayerNorm_{ln2}')):
            state[f'layers.{i}.{ours}.weight'] = torch.from_numpy(
                get(f'{block}{theirs}/scale', index))
            state[f'layers.{i}.{ours}.bias'] = torch.from_numpy(
                get(f'{block}{theirs}/bias', index))
        if i in blocks_without_mlp:
            continue
        for r, ours in ((0, 'layers.0.0'), (1, 'layers.1')):
            dense = f'{block}MlpBlock_{mlp}/Dense_{r}/'
            state[f'layers.{i}.ffn.{ours}.weight'] = _dense(
                get(dense + 'kernel', index))
            state[f'layers.{i}.ffn.{ours}.bias'] = torch.from_numpy(
                get(dense + 'bias', index))
    state['ln1.weight'] = torch.from_numpy(
        get('Transformer/encoder_norm/scale'))
    state['ln1.bias'] = torch.from_numpy(get('Transformer/encoder_norm/bias'))
    head = {}
    if prefix + 'head/kernel' in arrays:
        head = dict(
            weight=_dense(get('head/kernel')),
            bias=torch.from_numpy(get('head/bias')))
    return DenseViT(state, head, 'big_vision', num_heads)


# --- files -------------------------------------------------------------------
def unwrap_state_dict(obj) -> Dict[str, Tensor]:
    """The tensor dict inside a loaded ``.pth`` (``state_dict``, ``model``
    or ``module`` wrappers; ``model.`` / ``module.`` key prefixes)."""
    for key in ('state_dict', 'model', 'module'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(
            isinstance(v, Tensor) for v in obj.values()):
        raise ValueError('no state dict of tensors found in the checkpoint')
    for prefix in ('model.', 'module.'):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_torch_checkpoint(path: str):
    """``torch.load(weights_only=True)`` with one clear error naming the
    file (:func:`moe_plugin.fileio.load_torch_file`)."""
    from moe_plugin.fileio import load_torch_file
    return load_torch_file(path)


def detect_format(state: Dict[str, Tensor]) -> str:
    """'timm' or 'mmpretrain' from the key names."""
    keys = set(state)
    if any(k.startswith('blocks.') for k in keys) or \
            'patch_embed.proj.weight' in keys:
        return 'timm'
    if any(re.match(r'^(backbone\.)?layers\.\d+\.', k) for k in keys):
        return 'mmpretrain'
    raise ValueError(
        'cannot tell the checkpoint format from its keys (neither timm '
        f"'blocks.N.' nor MMPretrain 'layers.N.'), e.g. {sorted(keys)[:5]}")


def load_dense_vit(path: str, fmt: Optional[str] = None) -> DenseViT:
    """Read a dense ViT checkpoint of any supported format.

    Args:
        path (str): ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` /
            ``.npz`` file.
        fmt (str, optional): force 'timm', 'big_vision' or 'mmpretrain'.
            Defaults to None (detected).

    Returns:
        DenseViT: the canonical checkpoint.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f'unknown dense format {fmt!r}; valid: {FORMATS}')
    if not osp.isfile(path):
        raise FileNotFoundError(f'dense checkpoint {path!r} does not exist')
    try:
        if path.endswith('.npz') or fmt == 'big_vision':
            with np.load(path, allow_pickle=False) as arrays:
                return big_vision_to_canonical(dict(arrays))
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            try:
                state = load_file(path)
            except Exception as error:  # safetensors' own error type
                raise OSError(str(error)) from error
        else:
            state = unwrap_state_dict(load_torch_checkpoint(path))
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError,
            RuntimeError) as error:
        raise ValueError(f'cannot read dense checkpoint {path!r} (corrupt or '
                         f'truncated?): {error}') from error
    fmt = fmt or detect_format(state)
    if fmt == 'timm':
        return timm_to_canonical(state)
    return mmpretrain_to_canonical(state)
