"""MoE Jetpack checkpoints: converted logits against a slow forward of MoE
Jetpack's equations (``moejet_forward``, noise off), key layouts, the CLI
and bad input."""
import math
import os
import os.path as osp
import sys

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmpretrain.registry import MODELS

import moe_plugin  # noqa: F401
from moe_plugin.cli import EXPECTED_ERRORS
from moe_plugin.converters.moejet import convert_moejet, moejet_to_mmpretrain

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(REPO_ROOT, 'tools', 'model_converters'))
import moejet_to_mmpretrain as moejet_cli  # noqa: E402

DIM, HEADS, MLP, PATCH, IMG, CLASSES = 32, 2, 64, 4, 16, 7


def moejet_state(seed=0, depth=4, moe_blocks=(2, 3), core=3, univ=6,
                 slots=2, pool='avg', layer_scale=True, slot_norm=True,
                 expert_scales=False, qkv_bias=True, phi_std=1.0,
                 single=False):
    """Random MoE Jetpack (timm-style) weights, its parameter names."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=None):
        std = 1.0 / math.sqrt(shape[-1]) if std is None else std
        return torch.randn(*shape, generator=g) * std

    tokens = (IMG // PATCH)**2 + 1
    s = {
        'cls_token': normal(1, 1, DIM, std=0.5),
        'pos_embed': normal(1, tokens, DIM, std=0.2),
        'patch_embed.proj.weight': normal(DIM, 3, PATCH, PATCH, std=0.1),
        'patch_embed.proj.bias': normal(DIM, std=0.1),
        'head.weight': normal(CLASSES, DIM),
        'head.bias': normal(CLASSES, std=0.1),
    }
    norm = 'fc_norm' if pool == 'avg' else 'norm'
    s[f'{norm}.weight'] = 1 + normal(DIM, std=0.1)
    s[f'{norm}.bias'] = normal(DIM, std=0.1)
    univ_hidden = MLP // 4
    for i in range(depth):
        b = f'blocks.{i}.'
        for n in ('norm1', 'norm2'):
            s[b + n + '.weight'] = 1 + normal(DIM, std=0.1)
            s[b + n + '.bias'] = normal(DIM, std=0.1)
        s[b + 'attn.qkv.weight'] = normal(3 * DIM, DIM)
        if qkv_bias:
            s[b + 'attn.qkv.bias'] = normal(3 * DIM, std=0.1)
        s[b + 'attn.proj.weight'] = normal(DIM, DIM)
        s[b + 'attn.proj.bias'] = normal(DIM, std=0.1)
        if layer_scale:
            s[b + 'ls1.gamma'] = 1 + normal(DIM, std=0.3)
            s[b + 'ls2.gamma'] = 1 + normal(DIM, std=0.3)
        if i in moe_blocks:
            m = b + 'mlp.'
            s[m + 'phi'] = normal(core + univ, slots, DIM, std=phi_std)
            if slot_norm:
                s[m + 'slot_norm.weight'] = 1 + normal(DIM, std=0.1)
                s[m + 'slot_norm.bias'] = normal(DIM, std=0.1)
            if single:  # SoftMoELayerWrapper: one scale, one group
                s[m + 'phi'] = s[m + 'phi'][:core]
                s[m + 'scale'] = torch.tensor(4.0)
                groups = (('', core, MLP), )
            else:
                s[m + 'scales.0'] = torch.tensor(0.3)
                s[m + 'scales.1'] = torch.tensor(0.15)
                groups = (('core_', core, MLP), ('univ_', univ, univ_hidden))
            for group, count, hidden in groups:
                e = m + f'{group}experts.'
                s[e + 'vit_fc1.weight'] = normal(count, hidden, DIM)
                s[e + 'vit_fc1.bias'] = normal(count, hidden, std=0.1)
                s[e + 'vit_fc2.weight'] = normal(count, DIM, hidden)
                s[e + 'vit_fc2.bias'] = normal(count, DIM, std=0.1)
                if expert_scales:
                    for where in ('in', 'out'):
                        s[e + f'scale_{where}.gamma'] = 1 + normal(DIM,
                                                                   std=0.2)
                        s[e + f'scale_{where}.beta'] = normal(DIM, std=0.1)
        else:
            s[b + 'mlp.fc1.weight'] = normal(MLP, DIM)
            s[b + 'mlp.fc1.bias'] = normal(MLP, std=0.1)
            s[b + 'mlp.fc2.weight'] = normal(DIM, MLP)
            s[b + 'mlp.fc2.bias'] = normal(DIM, std=0.1)
    return s


def entmax15_bisect(z):
    """entmax-1.5 of one vector by bisection: ``p = [z / 2 - tau]_+^2``
    with ``tau`` such that ``sum p = 1``."""
    z = z / 2
    lo, hi = z.max() - 1.0, z.max()
    for _ in range(200):
        tau = (lo + hi) / 2
        if ((z - tau).clamp(min=0)**2).sum() >= 1:
            lo = tau
        else:
            hi = tau
    return (z - lo).clamp(min=0)**2


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean)**2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def l2norm(x):
    return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-6)


def experts(s, prefix, slots):
    """``slots`` ``[E, p, D]`` through MultiExpertLayer (``x W^T + b``)."""
    out = []
    for e in range(slots.shape[0]):
        x = slots[e]
        if prefix + 'scale_in.gamma' in s:
            x = x * s[prefix + 'scale_in.gamma'] + s[prefix + 'scale_in.beta']
        h = F.gelu(x @ s[prefix + 'vit_fc1.weight'][e].T +
                   s[prefix + 'vit_fc1.bias'][e])
        y = h @ s[prefix + 'vit_fc2.weight'][e].T + \
            s[prefix + 'vit_fc2.bias'][e]
        if prefix + 'scale_out.gamma' in s:
            y = y * s[prefix + 'scale_out.gamma'] + \
                s[prefix + 'scale_out.beta']
        out.append(y)
    return torch.stack(out)


def dual_path(s, m, x):
    """One image ``[N, D]`` through DualPathSoftMoELayerWrapper."""
    phi = s[m + 'phi']
    core = s[m + 'core_experts.vit_fc1.weight'].shape[0]
    key = l2norm(x)
    query = phi
    if m + 'slot_norm.weight' in s:
        query = layer_norm(query, s[m + 'slot_norm.weight'],
                           s[m + 'slot_norm.bias'], 1e-5)
    query = l2norm(query)
    logits = torch.einsum('nd,esd->nes', key, query)
    dispatch = (logits / s[m + 'scales.0']).softmax(0)
    flat = (logits / s[m + 'scales.1']).reshape(x.shape[0], -1)
    combine = torch.stack([entmax15_bisect(row) for row in flat])
    slots = torch.einsum('nd,nes->esd', x, dispatch)
    out = torch.cat([
        experts(s, m + 'core_experts.', slots[:core]),
        experts(s, m + 'univ_experts.', slots[core:])
    ])
    return combine @ out.reshape(-1, x.shape[-1])


def single_path(s, m, x):
    """One image ``[N, D]`` through SoftMoELayerWrapper: with the slot
    LayerNorm keys raw and queries ``LN(phi) * scale``, without it both
    l2-normalised; softmax dispatch and combine."""
    if m + 'slot_norm.weight' in s:
        key = x
        query = layer_norm(s[m + 'phi'], s[m + 'slot_norm.weight'],
                           s[m + 'slot_norm.bias'], 1e-5)
    else:
        key, query = l2norm(x), l2norm(s[m + 'phi'])
    logits = torch.einsum('nd,esd->nes', key, query * s[m + 'scale'])
    dispatch = logits.softmax(0)
    combine = logits.reshape(x.shape[0], -1).softmax(-1)
    slots = torch.einsum('nd,nes->esd', x, dispatch)
    out = experts(s, m + 'experts.', slots)
    return combine @ out.reshape(-1, x.shape[-1])


def moejet_forward(state, images):
    """MoE Jetpack's timm ViT forward, float64, noise off."""
    s = {k: v.double() for k, v in state.items()}
    x = F.conv2d(images.double(), s['patch_embed.proj.weight'],
                 s['patch_embed.proj.bias'], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s['cls_token'].expand(x.shape[0], -1, -1), x], 1)
    x = x + s['pos_embed']
    depth = 1 + max(int(k.split('.')[1]) for k in s if k.startswith('blocks'))
    hd = DIM // HEADS
    for i in range(depth):
        b = f'blocks.{i}.'
        h = layer_norm(x, s[b + 'norm1.weight'], s[b + 'norm1.bias'], 1e-6)
        qkv = h @ s[b + 'attn.qkv.weight'].T + s.get(b + 'attn.qkv.bias', 0)
        q, k, v = qkv.reshape(*h.shape[:2], 3, HEADS, hd).permute(
            2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1) @ v
        attn = attn.transpose(1, 2).reshape(h.shape)
        attn = attn @ s[b + 'attn.proj.weight'].T + s[b + 'attn.proj.bias']
        x = x + attn * s.get(b + 'ls1.gamma', 1)
        h = layer_norm(x, s[b + 'norm2.weight'], s[b + 'norm2.bias'], 1e-6)
        if b + 'mlp.scale' in s:
            y = torch.stack([single_path(s, b + 'mlp.', t) for t in h])
        elif b + 'mlp.phi' in s:
            y = torch.stack([dual_path(s, b + 'mlp.', t) for t in h])
        else:
            y = F.gelu(h @ s[b + 'mlp.fc1.weight'].T + s[b + 'mlp.fc1.bias'])
            y = y @ s[b + 'mlp.fc2.weight'].T + s[b + 'mlp.fc2.bias']
        x = x + y * s.get(b + 'ls2.gamma', 1)
    if 'fc_norm.weight' in s:
        x = layer_norm(x[:, 1:].mean(1), s['fc_norm.weight'],
                       s['fc_norm.bias'], 1e-6)
    else:
        x = layer_norm(x, s['norm.weight'], s['norm.bias'], 1e-6)[:, 0]
    return x @ s['head.weight'].T + s['head.bias']


def images(n, seed=0):
    return torch.randn(n, 3, IMG, IMG,
                       generator=torch.Generator().manual_seed(seed))


def build(state, arch_heads=HEADS):
    from moe_plugin.converters.moejet import model_config
    ours, arch = moejet_to_mmpretrain(state, arch_heads)
    model = MODELS.build(model_config(arch))
    model.load_state_dict(ours, strict=True)
    return model.eval(), arch


@pytest.mark.parametrize('kwargs', [
    # Slots of variance ~1e-5: the slot LayerNorm's eps (1e-5) matters.
    dict(phi_std=0.003),
    dict(pool='token', layer_scale=False, slots=1, qkv_bias=False),
    dict(slot_norm=False, expert_scales=True, moe_blocks=(1, 3)),
    # The single path (its Soft MoE baseline), with and without slot LN.
    dict(single=True, phi_std=0.5),
    dict(single=True, slot_norm=False, expert_scales=True),
])
def test_logits_match_moejet_equations(kwargs):
    state = moejet_state(**kwargs)
    model, arch = build(state)
    x = images(3)
    torch.testing.assert_close(
        model(x, mode='tensor').double(), moejet_forward(state, x),
        rtol=1e-4, atol=1e-4)
    assert arch.core_experts == 3
    assert arch.univ_experts == (0 if kwargs.get('single') else 6)
    # The reference is sensitive: entmax-1.5 combine, not a softmax.
    combine = torch.tensor([[3.0, 2.0, -2.0]])
    assert entmax15_bisect(combine[0])[2] == 0
    torch.testing.assert_close(
        entmax15_bisect(combine[0]).float(),
        __import__('entmax').entmax15(combine, dim=-1)[0])


@pytest.mark.parametrize('layout', ['bare', 'model_prefix', 'state_dict',
                                    'state_dict_bare'])
def test_key_layouts_and_cli(tmp_path, layout):
    state = moejet_state(1)
    obj = {
        'bare': state,
        'model_prefix': {
            **{f'model.{k}': v for k, v in state.items()},
            'data_preprocessor.mean': torch.zeros(3)
        },
        'state_dict': {
            'state_dict': {f'model.{k}': v for k, v in state.items()},
            'meta': {'epoch': 3}
        },
        'state_dict_bare': {'state_dict': state},
    }[layout]
    src = str(tmp_path / 'moejet.pth')
    torch.save(obj, src)
    out, cfg_path = str(tmp_path / 'out.pth'), str(tmp_path / 'cfg.py')
    moejet_cli.main([src, out, '--config-out', cfg_path, '--num-heads',
                     str(HEADS)])
    cfg = Config.fromfile(cfg_path)
    assert cfg.model.backbone.moe_cfg.combine == 'entmax15'
    assert cfg.test_dataloader.dataset.type == 'ImageNet'
    model = MODELS.build(cfg.model)
    loaded = torch.load(out, map_location='cpu', weights_only=True)
    model.load_state_dict(loaded['state_dict'], strict=True)
    x = images(2, seed=1)
    torch.testing.assert_close(
        model.eval()(x, mode='tensor').double(), moejet_forward(state, x),
        rtol=1e-4, atol=1e-4)


def test_default_heads_and_existing_output(tmp_path):
    state = moejet_state(2)
    _, arch = moejet_to_mmpretrain(state)
    assert arch.num_heads == 1  # 32 // 64 -> at least 1; ViT-T: 192 -> 3
    src, out = str(tmp_path / 'm.pth'), str(tmp_path / 'o.pth')
    torch.save(state, src)
    open(out, 'w').write('keep')
    with pytest.raises(EXPECTED_ERRORS, match='exists'):
        moejet_cli.main([src, out])
    assert open(out).read() == 'keep'


def _fails(tmp_path, state, match):
    src, out = str(tmp_path / 'bad.pth'), str(tmp_path / 'bad_out.pth')
    cfg_path = str(tmp_path / 'bad_cfg.py')
    torch.save(state, src)
    with pytest.raises(EXPECTED_ERRORS, match=match):
        moejet_cli.main([src, out, '--config-out', cfg_path])
    assert not osp.exists(out) and not osp.exists(cfg_path)
    assert not [f for f in os.listdir(tmp_path) if '.part' in f]


def test_bad_input(tmp_path):
    state = moejet_state(3)
    state['blocks.2.mlp.phi_key_proj.gamma'] = torch.ones(DIM)
    _fails(tmp_path, state, 'phi_key_proj')
    state = moejet_state(3)
    state['blocks.3.mlp.scale'] = torch.tensor(1.0)
    _fails(tmp_path, state,
           r"single path\) has unexpected \['scales.0', 'scales.1', 'univ")
    state = moejet_state(3)
    state['blocks.3.mlp.scales.1'] = torch.tensor(-0.2)
    _fails(tmp_path, state, 'scales.1')
    state = moejet_state(3)
    del state['head.weight']
    _fails(tmp_path, state, 'head.weight')
    src = str(tmp_path / 'trunc.pth')
    torch.save(moejet_state(3), src)
    data = open(src, 'rb').read()
    open(src, 'wb').write(data[:len(data) // 2])
    with pytest.raises(ValueError, match='trunc.pth is not a PyTorch'):
        convert_moejet(src)
