"""MoE Jetpack checkpoints into an MMPretrain ``MoEImageClassifier``.

MoE Jetpack (github.com/Adlith/MoE-Jetpack) trains timm ViTs
(``moejet/models/vit_softmoe_timm.py``) whose MoE blocks hold a
``DualPathSoftMoELayerWrapper`` as ``blocks.{i}.mlp``:

``phi`` ``(E_c + E_u, p, d)``, ``slot_norm.{weight, bias}``, ``scales.0`` /
``scales.1`` (dispatch / combine temperatures) and the stacked experts
``core_experts`` / ``univ_experts`` (``vit_fc1.weight`` ``(E, H, d)``,
``vit_fc2.weight`` ``(E, d, H)``, optional ``scale_in`` / ``scale_out``
``{gamma, beta}``). Its numerics are those of our
:class:`~moe_plugin.layers.SpheroMoE` with ``combine='entmax15'``: keys
``x / (|x| + 1e-6)``, queries the slot LayerNorm (eps 1e-5) then the same
ℓ2 normalisation, logits divided by the temperatures (we clamp them at
``min_temperature``, 1e-3; a checkpoint below that is refused), dispatch a
softmax over the tokens (class token included), combine entmax-1.5 over all
slots, slots mixing the raw LayerNorm-2 output, exact GELU, expert weights
applied as ``x W[e]^T + b[e]``. Its routing noise, which the original adds
in evaluation too, is off in our evaluation.

The dense rest uses timm's names and goes through
:func:`moe_plugin.recycling.formats.timm_to_canonical`; timm's layer scale
``ls1`` / ``ls2`` becomes MMPretrain's ``attn.gamma1`` / ``ffn.gamma2``
(``gamma2`` of the MoE block). Pooling: ``fc_norm`` present means
``global_pool='avg'`` (mean of the patch tokens, class token excluded, then
``fc_norm``: MMPretrain's ``avg_featmap`` without the final norm), ``norm``
present means ``'token'`` (final norm, then the class token).

The single-path layer (``SoftMoELayerWrapper``, its Soft MoE baseline:
``phi``, one ``scale`` multiplying the queries, ``experts.*``, optional
``slot_norm``) becomes a ``SpheroMoE(single_scale=True)``: with the slot
LayerNorm the keys are not normalised and the queries get no ℓ2, without it
both are ℓ2-normalised; softmax combine.
"""
import re
from typing import Dict, NamedTuple, Optional, Tuple

from torch import Tensor

#: Minimum temperature of :class:`~moe_plugin.layers.SpheroMoE`.
MIN_TEMPERATURE = 1e-3

_MOE_RE = re.compile(
    r'^blocks\.(\d+)\.mlp\.(phi|slot_norm\.(weight|bias)|scales\.[01]|scale|'
    r'(core_|univ_|)experts\.(vit_fc[12]\.(weight|bias)|'
    r'scale_(in|out)\.(gamma|beta)))$')
_LAYER_SCALE_RE = re.compile(r'^blocks\.(\d+)\.ls([12])\.gamma$')


class MoEJetArch(NamedTuple):
    """The architecture of a MoE Jetpack checkpoint, read from its shapes.

    Attributes:
        embed_dims, num_layers, num_heads, feedforward_channels (int): the
            ViT (heads are not stored: given or ``embed_dims // 64``).
        patch_size, img_size, in_channels (int): the patch embedding and the
            image size of its position embeddings.
        qkv_bias (bool): whether the attention has a qkv bias.
        layer_scale (bool): timm's ``ls1`` / ``ls2`` present.
        global_pool (str): 'avg' or 'token'.
        moe_layers (tuple): 0-based MoE block indices.
        core_experts, univ_experts, slots_per_expert (int): SpheroMoE sizes.
        core_hidden, univ_hidden (int): expert hidden widths.
        slot_layernorm (bool): slot LayerNorm present.
        expert_layer_scale (bool): ``scale_in`` / ``scale_out`` present.
        single_path (bool): the single-path layer (one ``scale``).
        num_classes (int): classes of ``head``.
    """
    embed_dims: int
    num_layers: int
    num_heads: int
    feedforward_channels: int
    patch_size: int
    img_size: int
    in_channels: int
    qkv_bias: bool
    layer_scale: bool
    global_pool: str
    moe_layers: Tuple[int, ...]
    core_experts: int
    univ_experts: int
    slots_per_expert: int
    core_hidden: int
    univ_hidden: int
    slot_layernorm: bool
    expert_layer_scale: bool
    single_path: bool
    num_classes: int


def normalize_keys(obj) -> Dict[str, Tensor]:
    """The timm state dict inside a loaded MoE Jetpack file: bare keys,
    ``model.``-prefixed, under ``state_dict`` (MMPretrain's
    ``TimmClassifier``); ``data_preprocessor.*`` entries are dropped."""
    from moe_plugin.recycling.formats import unwrap_state_dict
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        obj = obj['state_dict']
    if isinstance(obj, dict):
        obj = {
            k: v
            for k, v in obj.items()
            if not str(k).startswith(('data_preprocessor.',
                                      'model.data_preprocessor.'))
        }
    state = unwrap_state_dict(obj)
    if any(k.startswith('model.') for k in state):
        bare = [k for k in state if not k.startswith('model.')]
        if bare:
            raise ValueError(f'mixed prefixed and bare keys: {bare[:5]}')
        state = {k[len('model.'):]: v for k, v in state.items()}
    return state


def moejet_to_mmpretrain(
        state: Dict[str, Tensor],
        num_heads: Optional[int] = None) -> Tuple[Dict[str, Tensor],
                                                  MoEJetArch]:
    """Map a MoE Jetpack (timm-style) state dict to ours.

    Args:
        state (dict): timm keys (see :func:`normalize_keys`).
        num_heads (int, optional): attention heads (not stored in the
            checkpoint). Defaults to None: ``embed_dims // 64`` (ViT-T 3,
            ViT-S 6, ViT-B 12).

    Returns:
        tuple: the ``MoEImageClassifier`` state dict and the
        :class:`MoEJetArch`.
    """
    from moe_plugin.recycling.formats import timm_to_canonical
    for key in ('patch_embed.proj.weight', 'pos_embed', 'head.weight'):
        if key not in state:
            raise ValueError(f'not a MoE Jetpack ViT classifier: no {key!r}; '
                             f'keys include {sorted(state)[:6]}')
    moe, scales, dense = {}, {}, {}
    for key, value in state.items():
        match = _MOE_RE.match(key)
        if match:
            moe.setdefault(int(match.group(1)), {})[match.group(2)] = value
            continue
        match = _LAYER_SCALE_RE.match(key)
        if match:
            scales[int(match.group(1)), int(match.group(2))] = value
            continue
        dense[key] = value
    if not moe:
        raise ValueError(
            'no MoE block (blocks.N.mlp.phi / .core_experts...) in the '
            'checkpoint: it is a dense ViT, not a MoE Jetpack model; '
            'recycle a dense checkpoint with '
            'tools/gen_weight/gen_vit_moe_weight.py CONFIG --dense FILE')
    canonical = timm_to_canonical(dense)
    out = {'backbone.' + k: v for k, v in canonical.state.items()}
    out['head.fc.weight'] = canonical.head['weight']
    out['head.fc.bias'] = canonical.head['bias']
    num_layers = 1 + max(
        int(k.split('.')[1]) for k in state if k.startswith('blocks.'))

    moe_shapes = {}
    for block, params in sorted(moe.items()):
        # The single path (SoftMoELayerWrapper) has one `scale` and one
        # expert group `experts`: our single_scale layer's core group.
        single = 'scale' in params or any(
            k.startswith('experts.') for k in params)
        if single:
            params = {(f'core_{k}' if k.startswith('experts.') else k): v
                      for k, v in params.items()}
        scale_names = ('scale', ) if single else ('scales.0', 'scales.1')
        required = ('phi', *scale_names, 'core_experts.vit_fc1.weight',
                    'core_experts.vit_fc1.bias', 'core_experts.vit_fc2.weight',
                    'core_experts.vit_fc2.bias')
        missing = [n for n in required if n not in params]
        extra = [
            n for n in params
            if n.startswith('scale') and n not in scale_names or (
                single and n.startswith('univ_experts.'))
        ]
        if missing or extra:
            problems = ([f'lacks {missing}'] if missing else []) + (
                [f'has unexpected {extra}'] if extra else [])
            raise ValueError(
                f'MoE block {block} ({"single" if single else "dual"} '
                f'path) {"; ".join(problems)}')
        if not single:
            for i in (0, 1):
                value = float(params[f'scales.{i}'])
                if not value > MIN_TEMPERATURE:
                    raise ValueError(
                        f'blocks.{block}.mlp.scales.{i} = {value}: our '
                        f'SpheroMoE clamps temperatures at {MIN_TEMPERATURE}')
        prefix = f'backbone.layers.{block}.ffn.'
        out[prefix + 'phi'] = params['phi']
        for name in scale_names:
            out[prefix + name] = params[name].reshape(())
        for name in ('weight', 'bias'):
            if f'slot_norm.{name}' in params:
                out[prefix + f'slot_norm.{name}'] = params[f'slot_norm.{name}']
        sizes = []
        for group, theirs in enumerate(('core_experts', 'univ_experts')):
            if f'{theirs}.vit_fc1.weight' not in params:
                sizes.append((0, 0))
                continue
            fc1 = params[f'{theirs}.vit_fc1.weight']
            out[prefix + f'{theirs}.w1'] = fc1.transpose(1, 2)
            out[prefix + f'{theirs}.b1'] = params[f'{theirs}.vit_fc1.bias']
            out[prefix + f'{theirs}.w2'] = params[
                f'{theirs}.vit_fc2.weight'].transpose(1, 2)
            out[prefix + f'{theirs}.b2'] = params[f'{theirs}.vit_fc2.bias']
            for where in ('in', 'out'):
                for name in ('gamma', 'beta'):
                    key = f'{theirs}.scale_{where}.{name}'
                    if key in params:
                        out[prefix + f'scale_{where}.{group}.{name}'] = \
                            params[key]
            sizes.append(tuple(fc1.shape[:2]))
        phi = params['phi']
        (core, core_hidden), (univ, univ_hidden) = sizes
        if phi.shape[0] != core + univ:
            raise ValueError(f'blocks.{block}.mlp.phi has {phi.shape[0]} '
                             f'experts, the expert groups {core} + {univ}')
        moe_shapes[block] = (core, univ, phi.shape[1], core_hidden,
                             univ_hidden, 'slot_norm.weight' in params,
                             'core_experts.scale_in.gamma' in params, single)
    if len(set(moe_shapes.values())) > 1:
        raise ValueError('MoE blocks of different sizes are not supported: '
                         f'{moe_shapes}')
    for (block, which), value in scales.items():
        if which == 1:
            out[f'backbone.layers.{block}.attn.gamma1.weight'] = value
        elif block in moe:
            out[f'backbone.layers.{block}.gamma2.weight'] = value
        else:
            out[f'backbone.layers.{block}.ffn.gamma2.weight'] = value
    # timm_to_canonical placed the (absent) dense MLPs of MoE blocks nowhere.
    stray = [
        k for k in out if re.match(r'^backbone\.layers\.(\d+)\.ffn\.layers',
                                   k) and int(k.split('.')[2]) in moe
    ]
    if stray:
        raise ValueError(f'MoE blocks also hold a dense MLP: {stray}')

    proj = state['patch_embed.proj.weight']
    dims, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    has_cls = 'cls_token' in state
    tokens = state['pos_embed'].shape[1] - has_cls
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise ValueError(
            f'pos_embed {tuple(state["pos_embed"].shape)} is not a square '
            'grid plus the class token (no_embed_class checkpoints are '
            'not supported)')
    if ('fc_norm.weight' in state) == ('norm.weight' in state):
        raise ValueError('expected exactly one of norm (token pooling) and '
                         'fc_norm (mean pooling)')
    dense_blocks = [b for b in range(num_layers) if b not in moe]
    (core, univ, slots, core_hidden, univ_hidden, slot_ln, scale_io,
     single) = next(iter(moe_shapes.values()),
                    (0, 0, 0, 0, 0, False, False, False))
    arch = MoEJetArch(
        embed_dims=int(dims),
        num_layers=num_layers,
        num_heads=int(num_heads or max(1, dims // 64)),
        feedforward_channels=int(
            state[f'blocks.{dense_blocks[0]}.mlp.fc1.weight'].shape[0]
            if dense_blocks else core_hidden),
        patch_size=int(patch),
        img_size=int(grid * patch),
        in_channels=int(in_channels),
        qkv_bias='blocks.0.attn.qkv.bias' in state,
        layer_scale=bool(scales),
        global_pool='avg' if 'fc_norm.weight' in state else 'token',
        moe_layers=tuple(sorted(moe)),
        core_experts=int(core),
        univ_experts=int(univ),
        slots_per_expert=int(slots),
        core_hidden=int(core_hidden),
        univ_hidden=int(univ_hidden),
        slot_layernorm=bool(slot_ln),
        expert_layer_scale=bool(scale_io),
        single_path=bool(single),
        num_classes=int(state['head.weight'].shape[0]))
    if arch.embed_dims % arch.num_heads:
        raise ValueError(f'num_heads={arch.num_heads} does not divide '
                         f'embed_dims={arch.embed_dims}')
    return out, arch


def model_config(arch: MoEJetArch) -> dict:
    """The ``model`` config of a converted MoE Jetpack checkpoint.

    Args:
        arch (MoEJetArch): from :func:`moejet_to_mmpretrain`.

    Returns:
        dict: a ``MoEImageClassifier`` config.
    """
    backbone = dict(
        type='VisionMoE',
        arch=dict(
            embed_dims=arch.embed_dims,
            num_layers=arch.num_layers,
            num_heads=arch.num_heads,
            feedforward_channels=arch.feedforward_channels),
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        act='gelu',
        qkv_bias=arch.qkv_bias,
        moe_layers=list(arch.moe_layers))
    if arch.global_pool == 'avg':
        backbone.update(out_type='avg_featmap', final_norm=False)
    else:
        backbone.update(out_type='cls_token')
    if arch.in_channels != 3:
        backbone['in_channels'] = arch.in_channels
    if arch.layer_scale:
        # Any non-zero value creates the parameters; the checkpoint fills
        # them (timm's default init is 1e-5).
        backbone['layer_scale_init_value'] = 1e-5
    if arch.moe_layers and arch.single_path:
        # SoftMoELayerWrapper: with the slot LayerNorm neither keys nor
        # queries are l2-normalised; softmax combine.
        moe_cfg = dict(
            type='SpheroMoE',
            num_experts=arch.core_experts,
            slots_per_expert=arch.slots_per_expert,
            single_scale=True,
            normalize_keys=not arch.slot_layernorm,
            normalize_queries=not arch.slot_layernorm,
            slot_layernorm=arch.slot_layernorm,
            combine='softmax',
            expert_layer_scale=arch.expert_layer_scale)
    elif arch.moe_layers:
        moe_cfg = dict(
            type='SpheroMoE',
            num_experts=arch.core_experts,
            num_universal_experts=arch.univ_experts,
            slots_per_expert=arch.slots_per_expert,
            normalize_keys=True,
            slot_layernorm=arch.slot_layernorm,
            combine='entmax15',
            expert_layer_scale=arch.expert_layer_scale)
        if arch.univ_experts:
            # round(H * f) == univ_hidden exactly.
            moe_cfg['univ_factor'] = arch.univ_hidden / arch.core_hidden
    if arch.moe_layers:
        if arch.core_hidden != arch.feedforward_channels:
            moe_cfg['feedforward_channels'] = arch.core_hidden
        backbone['moe_cfg'] = moe_cfg
    return dict(
        type='MoEImageClassifier',
        backbone=backbone,
        neck=None,
        head=dict(
            type='LinearClsHead',
            num_classes=arch.num_classes,
            in_channels=arch.embed_dims,
            # MoE Jetpack's recipe: label smoothing 0.1.
            loss=dict(
                type='LabelSmoothLoss', label_smooth_val=0.1,
                mode='original'),
            topk=(1, 5) if arch.num_classes >= 5 else (1, )),
        # MoE Jetpack normalises with the ImageNet mean and std.
        data_preprocessor=dict(
            num_classes=arch.num_classes,
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            to_rgb=True))


def convert_moejet(path: str, num_heads: Optional[int] = None
                   ) -> Tuple[Dict[str, Tensor], dict, MoEJetArch]:
    """Load a MoE Jetpack ``.pth`` and convert it.

    Loaded with ``torch.load(weights_only=True)``; an MMPretrain run
    checkpoint (message hub, numpy scalars) through the scoped allow-list of
    :mod:`moe_plugin.compat`, as :mod:`moe_plugin.recycling.formats` does.

    Args:
        path (str): the checkpoint.
        num_heads (int, optional): see :func:`moejet_to_mmpretrain`.

    Returns:
        tuple: the state dict, the ``model`` config and the architecture.
    """
    import os.path as osp
    import pickle
    import zipfile

    from moe_plugin.recycling.formats import load_torch_checkpoint
    if not osp.isfile(path):
        raise FileNotFoundError(f'MoE Jetpack checkpoint {path!r} does not '
                                'exist')
    try:
        obj = load_torch_checkpoint(path)
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError,
            RuntimeError) as error:
        raise ValueError(f'cannot read {path!r} (corrupt or truncated?): '
                         f'{error}') from error
    state, arch = moejet_to_mmpretrain(normalize_keys(obj), num_heads)
    return state, model_config(arch), arch
