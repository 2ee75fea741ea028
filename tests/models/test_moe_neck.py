import pytest
import torch
import torch.nn.functional as F
from mmpretrain.models import (ConvNeXt, ResNet, SwinTransformer,
                               VisionTransformer)
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

import moe_plugin  # noqa: F401
from moe_plugin.models import MoENeck

# No router noise and room for every token: each token is routed alone.
MOE_CFG = dict(
    type='SparseMoE',
    num_experts=4,
    top_k=2,
    noise_std=0.0,
    capacity_factor=4.0,
    eval_capacity_factor=4.0)


def neck(**kwargs):
    cfg = dict(in_channels=32, moe_cfg=MOE_CFG)
    cfg.update(kwargs)
    torch.manual_seed(0)
    model = MoENeck(**cfg)
    model.init_weights()
    with torch.no_grad():
        # Non-trivial norms, so that a skipped or swapped norm shows.
        for name, param in model.named_parameters():
            if name.endswith(('ln.weight', 'norm.weight')):
                param.uniform_(0.5, 1.5)
            elif name.endswith(('ln.bias', 'norm.bias')):
                param.uniform_(-0.5, 0.5)
    return model.eval()


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def slow_tokens(model, tokens):
    """The neck's tokens before pooling, one block at a time, by hand."""
    x = tokens
    if isinstance(model.proj, torch.nn.Linear):
        x = x @ model.proj.weight.t() + model.proj.bias
    for block in model.blocks:
        normed = F.layer_norm(x, (x.shape[-1], ), block.ln.weight,
                              block.ln.bias, 1e-6)
        x = x + block.moe(normed)
    return F.layer_norm(x, (x.shape[-1], ), model.norm.weight,
                        model.norm.bias, 1e-6)


@pytest.mark.parametrize('in_channels, embed_dims', [(32, None), (48, 32)])
@pytest.mark.parametrize('num_blocks', [1, 2])
def test_gap_on_feature_map_by_hand(in_channels, embed_dims, num_blocks):
    model = neck(
        in_channels=in_channels, embed_dims=embed_dims, num_blocks=num_blocks)
    fmap = randn(2, in_channels, 3, 4)
    tokens = fmap.permute(0, 2, 3, 1).reshape(2, 12, in_channels)
    with torch.no_grad():
        out = model((randn(2, 8, 6, 8, seed=5), fmap))
        expected = slow_tokens(model, tokens).mean(dim=1)
    assert isinstance(out, tuple) and len(out) == 1
    assert out[0].shape == (2, 32)
    torch.testing.assert_close(out[0], expected)
    assert len(model.blocks) == num_blocks
    assert isinstance(model.proj, torch.nn.Linear) == (embed_dims == 32)


def test_token_and_gap_with_class_token():
    tokens = randn(2, 1 + 9, 32)
    with torch.no_grad():
        token_out = neck(pool='token', num_extra_tokens=1)(tokens)[0]
        gap_out = neck(pool='gap', num_extra_tokens=1)(tokens)[0]
        processed = slow_tokens(neck(), tokens)
    torch.testing.assert_close(token_out, processed[:, 0])
    torch.testing.assert_close(gap_out, processed[:, 1:].mean(dim=1))
    # Tokens are routed one by one, so only the class token moves 'token'.
    changed = tokens.clone()
    changed[:, 0] += 3.0
    with torch.no_grad():
        assert torch.equal(
            neck(pool='gap', num_extra_tokens=1)(changed)[0], gap_out)
        assert not torch.allclose(
            neck(pool='token', num_extra_tokens=1)(changed)[0], token_out)


def test_map_pool_is_timm_attention_pool_over_patch_tokens():
    model = neck(pool='map', num_extra_tokens=1, num_heads=4)
    tokens = randn(2, 1 + 9, 32)
    with torch.no_grad():
        out = model(tokens)[0]
        processed = slow_tokens(model, tokens)[:, 1:]
        pool = model.attn_pool
        # timm's AttentionPoolLatent written out: one latent query.
        q = pool.q(pool.latent.expand(2, -1, -1)).reshape(2, 1, 4, 8)
        kv = pool.kv(processed).reshape(2, 9, 2, 4, 8).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        q = q.transpose(1, 2)
        attn = (q @ k.transpose(-2, -1) * 8**-0.5).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(2, 1, 32)
        x = pool.proj(x)
        x = x + pool.mlp(pool.norm(x))
        expected = x[:, 0]
    assert out.shape == (2, 32)
    torch.testing.assert_close(out, expected)


def test_feature_map_equals_its_tokens():
    model = neck(in_channels=48, embed_dims=32)
    fmap = randn(2, 48, 2, 5)
    with torch.no_grad():
        from_map = model(fmap)[0]
        from_tokens = model(fmap.flatten(2).transpose(1, 2))[0]
    torch.testing.assert_close(from_map, from_tokens)


def tiny_backbones():
    torch.manual_seed(0)
    return [
        (ResNet(depth=18, stem_channels=8, base_channels=8), 64, 0),
        (ConvNeXt(
            arch=dict(depths=[1, 1, 1, 1], channels=[8, 16, 16, 32]),
            gap_before_final_norm=False), 32, 0),
        (VisionTransformer(
            arch=dict(
                embed_dims=32,
                num_layers=2,
                num_heads=2,
                feedforward_channels=64),
            img_size=32,
            patch_size=8,
            out_type='raw'), 32, 1),
        (SwinTransformer(
            arch=dict(embed_dims=16, depths=[1, 1], num_heads=[1, 2]),
            img_size=32,
            window_size=4,
            out_indices=(1, )), 32, 0),
    ]


@pytest.mark.parametrize('index', range(4))
@pytest.mark.parametrize('pool', ['gap', 'map', 'token'])
def test_on_real_backbones_every_parameter_gets_a_gradient(index, pool):
    backbone, channels, extra = tiny_backbones()[index]
    if pool == 'token' and not extra:
        pytest.skip('no class token')
    model = neck(
        in_channels=channels,
        embed_dims=48,
        num_blocks=2,
        pool=pool,
        num_extra_tokens=extra)
    model.train()
    backbone.train()
    out = model(backbone(randn(2, 3, 32, 32)))[0]
    assert out.shape == (2, 48)
    (out * randn(*out.shape, seed=3)).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_classifier_adds_the_neck_aux_loss():
    model = MODELS.build(
        dict(
            type='MoEImageClassifier',
            aux_loss_weights=dict(importance=0.5),
            backbone=dict(
                type='ResNet', depth=18, stem_channels=8, base_channels=8),
            neck=dict(
                type='MoENeck',
                in_channels=64,
                embed_dims=32,
                num_blocks=2,
                moe_cfg=MOE_CFG),
            head=dict(
                type='LinearClsHead',
                num_classes=3,
                in_channels=32,
                loss=dict(type='CrossEntropyLoss'))))
    model.train()
    samples = [DataSample().set_gt_label(i % 3) for i in range(4)]
    losses = model.loss(randn(4, 3, 32, 32), samples)
    blocks = model.neck.blocks
    expected = 0.5 * sum(b.moe.moe_metrics['importance_loss'] for b in blocks)
    assert expected > 0
    torch.testing.assert_close(losses['loss_moe_aux'], expected)
    assert 'moe.neck.blocks.1.moe.dropped' in losses
    assert [name for name, _ in model.moe_modules
            ] == ['neck.blocks.0.moe', 'neck.blocks.1.moe']


def test_num_tokens_filled_in():
    calls = []

    @MODELS.register_module(force=True)
    class RecordingMoE(torch.nn.Module):

        def __init__(self, embed_dims, feedforward_channels, num_tokens=None):
            super().__init__()
            calls.append((embed_dims, feedforward_channels, num_tokens))
            self.fc = torch.nn.Linear(embed_dims, embed_dims)

        def forward(self, x):
            return self.fc(x)

    try:
        MoENeck(
            in_channels=64,
            embed_dims=32,
            num_blocks=2,
            num_tokens=49,
            moe_cfg=dict(type='RecordingMoE'))
        MoENeck(
            in_channels=64,
            feedforward_channels=96,
            moe_cfg=dict(type='RecordingMoE'))
    finally:
        MODELS.module_dict.pop('RecordingMoE')
    assert calls == [(32, 128, 49), (32, 128, 49), (64, 96, None)]


@pytest.mark.parametrize('kwargs, pattern', [
    (dict(pool='cls'), "`pool` must be one of .*, got 'cls'"),
    (dict(pool='token'), '`num_extra_tokens` >= 1, got 0'),
    (dict(pool='map', num_heads=5),
     r'`embed_dims` \(32\) must be divisible by `num_heads` \(5\)'),
    (dict(in_channels=0), '`in_channels` must be a positive int, got 0'),
    (dict(num_blocks=0), '`num_blocks` must be a positive int, got 0'),
    (dict(embed_dims=-1), '`embed_dims` must be a positive int, got -1'),
    (dict(num_extra_tokens=-1), '`num_extra_tokens` must be an int >= 0'),
    (dict(drop_path_rate=1.0), r'`drop_path_rate` must be in \[0, 1\)'),
    (dict(moe_cfg=dict(type='NoSuchMoE')), "type='NoSuchMoE'"),
])
def test_config_errors(kwargs, pattern):
    cfg = dict(in_channels=32, moe_cfg=MOE_CFG)
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        MoENeck(**cfg)


@pytest.mark.parametrize('inputs, kwargs, pattern', [
    ((randn(2, 48, 4, 4), ), dict(),
     r'in_channels=32 but got input of width 48 \(shape \(2, 48, 4, 4\)\)'),
    (randn(2, 10, 16), dict(), 'in_channels=32 but got input of width 16'),
    (randn(2, 32, 4, 4), dict(pool='token', num_extra_tokens=1),
     'needs token input'),
    (randn(2, 32), dict(), r'got shape \(2, 32\)'),
])
def test_input_errors(inputs, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        neck(**kwargs)(inputs)


def test_registered():
    model = MODELS.build(dict(type='MoENeck', in_channels=32, moe_cfg=MOE_CFG))
    assert isinstance(model, MoENeck)


@pytest.mark.parametrize('path, size', [
    ('configs/moe_neck/resnet50-moeneck_8xb32_in1k.py', 64),
    ('configs/demo/resnet-moeneck-demo_2xb64_digits.py', 32),
])
def test_resnet_neck_configs_build_and_run(path, size):
    # MMPretrain's ResNet cannot be built on the meta device, so these are
    # built here for real (tests/test_configs.py builds on meta).
    import os.path as osp

    from mmengine.config import Config
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    cfg = Config.fromfile(osp.join(root, path))
    model = MODELS.build(cfg.model).eval()
    neck_cfg = cfg.model.neck
    assert isinstance(model.neck, MoENeck)
    assert len(model.neck.blocks) == neck_cfg.num_blocks
    with torch.no_grad():
        feats = model.extract_feat(randn(1, 3, size, size))
    assert feats[0].shape == (1, neck_cfg.embed_dims)
    assert [name for name, _ in model.moe_modules] == [
        f'neck.blocks.{i}.moe' for i in range(neck_cfg.num_blocks)
    ]


def test_soft_layer_interface_in_neck_and_convnext():
    # A stand-in with the agreed Soft MoE interface: slots mix all tokens of
    # an image, `num_tokens` sets the slot count, metrics have no losses.
    @MODELS.register_module(force=True)
    class TinySoftMoE(torch.nn.Module):

        def __init__(self, embed_dims, feedforward_channels, num_tokens=None):
            super().__init__()
            self.slots = torch.nn.Parameter(
                torch.randn(num_tokens, embed_dims))
            self.fc = torch.nn.Linear(embed_dims, embed_dims)
            self.moe_metrics = {}

        def forward(self, x):
            logits = torch.einsum('bnd,sd->bns', x, self.slots)
            slots = torch.einsum('bns,bnd->bsd', logits.softmax(dim=1), x)
            out = torch.einsum('bns,bsd->bnd', logits.softmax(dim=2),
                               self.fc(slots))
            self.moe_metrics = dict(expert_load=logits.softmax(2).mean((0, 1)))
            return out

    try:
        model = MODELS.build(
            dict(
                type='MoEImageClassifier',
                backbone=dict(
                    type='ConvNeXtMoE',
                    arch=dict(depths=[1, 1, 1, 1], channels=[8, 8, 16, 16]),
                    img_size=32,
                    gap_before_final_norm=False,
                    moe_blocks=[[], [], [0], []],
                    moe_cfg=dict(type='TinySoftMoE')),
                neck=dict(
                    type='MoENeck',
                    in_channels=16,
                    num_tokens=1,
                    moe_cfg=dict(type='TinySoftMoE')),
                head=dict(
                    type='LinearClsHead', num_classes=3, in_channels=16)))
    finally:
        MODELS.module_dict.pop('TinySoftMoE')
    # 32 px: stage 2 is 2x2, stage 3 (the neck's input) 1x1.
    assert model.backbone.stages[2][0].moe.slots.shape == (4, 16)
    assert model.neck.blocks[0].moe.slots.shape == (1, 16)
    model.train()
    samples = [DataSample().set_gt_label(i % 3) for i in range(2)]
    losses = model.loss(randn(2, 3, 32, 32), samples)
    assert losses['loss_moe_aux'] == 0
    assert len(model.moe_modules) == 2
    (losses['loss_cls'] + losses['loss_moe_aux']).backward()
    assert model.neck.blocks[0].moe.slots.grad is not None
    assert model.backbone.stages[2][0].moe.slots.grad.abs().sum() > 0
