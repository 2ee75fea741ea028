import re

import pytest
import torch
import torch.nn.functional as F
from mmpretrain.models import VisionTransformer
from mmpretrain.registry import MODELS

import moe_plugin  # noqa: F401
from moe_plugin.layers import SparseMoE
from moe_plugin.models import (VisionMoE, build_moe_layer, parse_moe_layers,
                               register_moe_layers)
from moe_plugin.models.backbones import MoETransformerEncoderLayer

ARCH = dict(embed_dims=32, num_layers=4, num_heads=2, feedforward_channels=64)
MOE_CFG = dict(type='SparseMoE', num_experts=4, top_k=2)


def tiny_vit(**kwargs):
    cfg = dict(arch=ARCH, img_size=32, patch_size=8)
    cfg.update(kwargs)
    torch.manual_seed(0)
    model = VisionTransformer(**cfg)
    model.init_weights()
    model.eval()
    return model


def tiny_moe(**kwargs):
    cfg = dict(arch=ARCH, img_size=32, patch_size=8, moe_cfg=MOE_CFG)
    cfg.update(kwargs)
    torch.manual_seed(0)
    model = VisionMoE(**cfg)
    model.init_weights()
    model.eval()
    return model


def images(batch=2, size=32):
    return torch.randn(
        batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# --- moe_layers, arch, builder -------------------------------------------


@pytest.mark.parametrize('spec, num_layers, expected', [
    ('every-2', 12, [1, 3, 5, 7, 9, 11]),
    ('every-1', 3, [0, 1, 2]),
    ('every-4', 8, [3, 7]),
    ('last-2', 8, [5, 7]),
    ('last-1', 12, [11]),
    ('last-6', 12, [1, 3, 5, 7, 9, 11]),
    ([6, 11, 7], 12, [6, 7, 11]),
    ([], 12, []),
    (None, 12, []),
])
def test_parse_moe_layers(spec, num_layers, expected):
    assert parse_moe_layers(spec, num_layers) == expected


@pytest.mark.parametrize('spec, pattern', [
    ('every-0', 'n >= 1'),
    ('last-0', 'n >= 1'),
    ('last-3', "'last-3' asks for 3 odd blocks but 4 blocks have only 2"),
    ('every-5', 'selects no block out of 4'),
    ('first-2', "'every-<n>', 'last-<n>'"),
    ([4], r'index 4 is not a block index in \[0, 4\)'),
    ([-1], r'index -1 is not a block index in \[0, 4\)'),
    ([1.0], r'index 1.0 is not a block index'),
    ([1, 3, 1], 'duplicate'),
])
def test_parse_moe_layers_errors(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_moe_layers(spec, 4)
    with pytest.raises(ValueError, match=pattern):
        VisionMoE(arch=ARCH, img_size=16, patch_size=8, moe_layers=spec)


def test_moe_blocks_placed():
    model = tiny_moe(moe_layers='last-2')
    assert model.moe_layers == (1, 3)
    kinds = [
        isinstance(layer, MoETransformerEncoderLayer) for layer in model.layers
    ]
    assert kinds == [False, True, False, True]
    assert isinstance(model.layers[3].ffn, SparseMoE)
    assert model.layers[3].ffn.num_experts == 4


@pytest.mark.parametrize('arch, sizes', [
    ('vmoe-s', (512, 8, 8, 2048)),
    ('VMoE-B', (768, 12, 12, 3072)),
    ('vmoe-large', (1024, 24, 16, 4096)),
    ('vmoe-h', (1280, 32, 16, 5120)),
    ('deit-tiny', (192, 12, 3, 768)),
    ('deit-s', (384, 12, 6, 1536)),
    ('deit-base', (768, 12, 12, 3072)),
])
def test_arch_zoo(arch, sizes):
    settings = VisionMoE._resolve_arch(arch)
    assert (settings['embed_dims'], settings['num_layers'],
            settings['num_heads'], settings['feedforward_channels']) == sizes


def test_arch_errors():
    with pytest.raises(ValueError, match=r"Unknown `arch` 'vmoe-xl'.*vmoe-s"):
        VisionMoE(arch='vmoe-xl')
    with pytest.raises(ValueError, match='feedforward_channels'):
        VisionMoE(arch=dict(embed_dims=32, num_layers=2, num_heads=2))
    with pytest.raises(ValueError, match="`act` must be one of.*'relu'"):
        VisionMoE(arch=ARCH, img_size=16, patch_size=8, act='relu')


def test_build_moe_layer():
    layer = build_moe_layer(
        dict(type='SparseMoE', num_experts=3), 32, 64, act='gelu')
    assert isinstance(layer, SparseMoE)
    assert tuple(layer.experts.w1.shape) == (3, 32, 64)
    assert layer.experts.act.approximate == 'none'
    # Values given in the config win over the backbone's defaults, and the
    # caller's dict is not modified.
    cfg = dict(type='SparseMoE', feedforward_channels=16, act='gelu_tanh')
    layer = build_moe_layer(cfg, 32, 64, act='gelu')
    assert tuple(layer.experts.w1.shape) == (8, 32, 16)
    assert layer.experts.act.approximate == 'tanh'
    assert cfg == dict(
        type='SparseMoE', feedforward_channels=16, act='gelu_tanh')

    # Defaults the layer does not accept (here `act`) are left out.

    class NoActLayer(torch.nn.Module):

        def __init__(self, embed_dims, feedforward_channels):
            super().__init__()
            self.fc = torch.nn.Linear(embed_dims, feedforward_channels)

    layer = build_moe_layer(dict(type=NoActLayer), 32, 8, act='gelu')
    assert layer.fc.out_features == 8


def test_build_moe_layer_errors():
    with pytest.raises(ValueError, match="`moe_cfg`.*type=None"):
        build_moe_layer(dict(num_experts=4), 32, 64)
    with pytest.raises(ValueError, match="`moe_cfg`.*type='NoSuchMoE'"):
        build_moe_layer(dict(type='NoSuchMoE'), 32, 64)
    with pytest.raises(ValueError, match="type='NoSuchMoE'"):
        VisionMoE(
            arch=ARCH,
            img_size=16,
            patch_size=8,
            moe_cfg=dict(type='NoSuchMoE'))


def test_registration_idempotent():
    assert MODELS.get('SparseMoE') is SparseMoE
    assert MODELS.get('VisionMoE') is VisionMoE
    assert 'SparseMoE' in register_moe_layers()
    assert MODELS.get('SparseMoE') is SparseMoE

    class SparseMoE2(SparseMoE):
        pass

    SparseMoE2.__name__ = 'SparseMoE'
    with pytest.raises(KeyError, match='SparseMoE'):
        MODELS.register_module(module=SparseMoE2)


# --- dense compatibility ---------------------------------------------------


@pytest.mark.parametrize('out_type', ['cls_token', 'avg_featmap'])
def test_mmpretrain_checkpoint_strict_and_identical(out_type):
    vit = tiny_vit(out_type=out_type)
    model = tiny_moe(moe_layers=[], act='gelu', out_type=out_type)
    model.load_state_dict(vit.state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x)[0], vit(x)[0])


def test_mmpretrain_checkpoint_into_moe_model():
    vit = tiny_vit()
    model = tiny_moe(moe_layers='every-2')
    result = model.load_state_dict(vit.state_dict(), strict=False)
    moe_keys = {
        f'layers.{i}.ffn.{name}'
        for i in (1, 3)
        for name in ('router.weight', 'experts.w1', 'experts.b1', 'experts.w2',
                     'experts.b2')
    }
    dense_ffn_keys = {
        f'layers.{i}.ffn.{name}'
        for i in (1, 3)
        for name in ('layers.0.0.weight', 'layers.0.0.bias', 'layers.1.weight',
                     'layers.1.bias')
    }
    assert set(result.missing_keys) == moe_keys
    assert set(result.unexpected_keys) == dense_ffn_keys
    state = model.state_dict()
    for key, value in vit.state_dict().items():
        if key not in dense_ffn_keys:
            assert torch.equal(state[key], value), key


def test_pos_embed_resized_on_load():
    vit = tiny_vit()
    model = tiny_moe(img_size=64)
    model.load_state_dict(vit.state_dict(), strict=False)
    src = vit.pos_embed.detach()
    grid = src[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected_grid = F.interpolate(
        grid, size=(8, 8), mode='bicubic', align_corners=False)
    expected = torch.cat(
        [src[:, :1], expected_grid.flatten(2).transpose(1, 2)], dim=1)
    assert model.pos_embed.shape == (1, 65, 32)
    torch.testing.assert_close(model.pos_embed.detach(), expected)


def test_shape_mismatch_names_key_and_shapes():
    model = tiny_moe()
    state = model.state_dict()
    state['layers.0.attn.qkv.weight'] = torch.zeros(192, 64)
    with pytest.raises(
            ValueError,
            match=re.escape('layers.0.attn.qkv.weight: checkpoint (192, 64) '
                            'vs model (96, 32)')):
        model.load_state_dict(state, strict=False)

    wide = VisionTransformer(
        arch=dict(ARCH, embed_dims=64), img_size=32, patch_size=8)
    with pytest.raises(
            ValueError,
            match=re.escape('checkpoint (1, 1, 64) vs model (1, 1, 32)')):
        model.load_state_dict(wide.state_dict(), strict=False)


def test_layer_depth():
    model = tiny_moe(moe_layers=[1])
    # The router at the top depth, the experts at their block's.
    assert model.get_layer_depth('layers.1.ffn.router.weight') == (5, 6)
    assert model.get_layer_depth('layers.1.ffn.experts.w2') == (2, 6)
    assert model.get_layer_depth('layers.0.ffn.layers.1.weight') == (1, 6)
    assert model.get_layer_depth('pos_embed') == (0, 6)
    assert model.get_layer_depth('ln1.weight') == (5, 6)


# --- heads and activation --------------------------------------------------


def test_out_types():
    x = images()
    batch, dims = x.shape[0], ARCH['embed_dims']
    for out_type in ('token', 'cls_token', 'gap', 'map', 'avg_featmap'):
        model = tiny_moe(out_type=out_type)
        with torch.no_grad():
            assert model(x)[0].shape == (batch, dims), out_type
    assert tiny_moe(out_type='token').out_type == 'cls_token'
    with pytest.raises(ValueError, match='out_type'):
        tiny_moe(out_type='mean')


@pytest.mark.parametrize('with_cls_token', [True, False])
def test_gap_is_mean_of_normed_patch_tokens(with_cls_token):
    model = tiny_moe(out_type='gap', with_cls_token=with_cls_token)
    assert not hasattr(model, 'ln2')
    x = images()
    with torch.no_grad():
        pooled = model(x)[0]
        model.out_type = 'raw'
        raw = model(x)[0]
    assert raw.shape[1] == 16 + int(with_cls_token)
    reference = raw[:, int(with_cls_token):].mean(dim=1)
    torch.testing.assert_close(pooled, reference)


def test_map_pools_normed_patch_tokens():
    model = tiny_moe(out_type='map', with_cls_token=False)
    pool = model.attn_pool
    assert pool.norm.eps == 1e-6
    assert pool.mlp.act.approximate == 'tanh'
    assert pool.mlp.fc1.out_features == ARCH['feedforward_channels']
    x = images()
    with torch.no_grad():
        pooled = model(x)[0]
        model.out_type = 'raw'
        raw = model(x)[0]
        # big_vision's MAP head, written out: probe attention, then
        # x + MLP(LN(x)).
        heads, dims = ARCH['num_heads'], ARCH['embed_dims']
        q = pool.q(pool.latent).reshape(1, heads, dims // heads)
        k, v = pool.kv(raw).reshape(2, 16, 2, heads,
                                    dims // heads).permute(2, 0, 3, 1, 4)
        attn = torch.einsum('hd,bhnd->bhn', q[0], k) * (dims // heads)**-0.5
        y = torch.einsum('bhn,bhnd->bhd', attn.softmax(-1), v).reshape(2, -1)
        y = pool.proj(y)
        reference = y + pool.mlp(pool.norm(y))
    torch.testing.assert_close(pooled, reference)


def test_gelu_tanh_in_every_ffn():
    model = tiny_moe(moe_layers=[1], act='gelu_tanh')
    x = torch.randn(2, 5, 32)
    ffn = model.layers[0].ffn
    fc1, fc2 = ffn.layers[0][0], ffn.layers[1]
    with torch.no_grad():
        # Make the pre-activations large enough for the two GELUs to differ.
        fc1.weight.mul_(20)
        expected = x + fc2(F.gelu(fc1(x), approximate='tanh'))
        exact = x + fc2(F.gelu(fc1(x)))
        out = ffn(x, identity=x)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, exact)
    for i in (0, 2, 3):
        assert model.layers[i].ffn.layers[0][1].approximate == 'tanh'
    assert model.layers[1].ffn.experts.act.approximate == 'tanh'

    exact_model = tiny_moe(moe_layers=[1], act='gelu')
    assert exact_model.layers[0].ffn.layers[0][1].approximate == 'none'
    assert exact_model.layers[1].ffn.experts.act.approximate == 'none'


def test_moe_block_adds_residual():
    model = tiny_moe(moe_layers=[1])
    block = model.layers[1]
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        h = x + block.attn(block.ln1(x))
        expected = h + block.ffn(block.ln2(h))
        torch.testing.assert_close(block(x), expected)


def test_eval_deterministic_and_frozen():
    model = tiny_moe(moe_layers='every-1', moe_cfg=dict(MOE_CFG, noise_std=5))
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x)[0], model(x)[0])

    frozen = VisionMoE(
        arch=ARCH,
        img_size=32,
        patch_size=8,
        moe_cfg=MOE_CFG,
        out_type='map',
        frozen_stages=4)
    assert not any(p.requires_grad for p in frozen.parameters())
