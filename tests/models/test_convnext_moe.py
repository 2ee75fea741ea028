import pytest
import torch
import torch.nn.functional as F
from mmpretrain.models import ConvNeXt
from mmpretrain.models.backbones.convnext import ConvNeXtBlock
from mmpretrain.registry import MODELS

import moe_plugin  # noqa: F401
from moe_plugin.models.backbones import (ConvNeXtMoE, ConvNeXtMoEBlock,
                                         parse_moe_blocks)

ARCH = dict(depths=[1, 1, 3, 2], channels=[16, 16, 32, 48])
MOE_CFG = dict(type='SparseMoE', num_experts=4, top_k=2, noise_std=0.0)
# One expert, top-1, renormalized, room for every token: the dense MLP.
ONE_EXPERT = dict(
    type='SparseMoE',
    num_experts=1,
    top_k=1,
    renormalize=True,
    capacity_factor=1.0,
    eval_capacity_factor=1.0,
    noise_std=0.0,
    act='gelu')


def dense(**kwargs):
    torch.manual_seed(0)
    model = ConvNeXt(arch=ARCH, **kwargs)
    model.init_weights()
    # MMPretrain's ConvNeXt.train returns None.
    model.eval()
    return model


def moe(**kwargs):
    cfg = dict(arch=ARCH, img_size=32, moe_cfg=MOE_CFG)
    cfg.update(kwargs)
    torch.manual_seed(0)
    model = ConvNeXtMoE(**cfg)
    model.init_weights()
    # MMPretrain's ConvNeXt.train returns None.
    model.eval()
    return model


def images(batch=2, size=32):
    return torch.randn(
        batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def copy_mlp_into_expert(block, moe_block):
    """Copy a dense block's pointwise MLP into a one-expert MoE."""
    experts = moe_block.moe.experts
    with torch.no_grad():
        experts.w1[0].copy_(block.pointwise_conv1.weight.t())
        experts.b1[0].copy_(block.pointwise_conv1.bias)
        experts.w2[0].copy_(block.pointwise_conv2.weight.t())
        experts.b2[0].copy_(block.pointwise_conv2.bias)


def randomize_gamma(model):
    # The default layer scale 1e-6 would hide any error in the MLP branch.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('gamma'):
                param.copy_(torch.linspace(0.5, 1.5, param.numel()))


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(out_indices=(1, 3), gap_before_final_norm=False),
    dict(moe_blocks=[[], None, [], []]),
])
def test_no_moe_equals_convnext_bit_for_bit(kwargs):
    base_kwargs = {
        k: v
        for k, v in kwargs.items() if k in ('out_indices',
                                            'gap_before_final_norm')
    }
    reference = dense(**base_kwargs)
    model = moe(**kwargs)
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        for out, ref in zip(model(x), reference(x)):
            assert torch.equal(out, ref)


@pytest.mark.parametrize('with_cp', [False, True])
def test_single_expert_copy_equals_dense_block(with_cp):
    reference = dense(drop_path_rate=0.0, with_cp=with_cp)
    randomize_gamma(reference)
    blocks = [[], [0], [0, 2], 'all']
    model = moe(moe_blocks=blocks, moe_cfg=ONE_EXPERT, with_cp=with_cp)
    state = reference.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    replaced = {(1, 0), (2, 0), (2, 2), (3, 0), (3, 1)}
    assert sorted(unexpected) == sorted(
        f'stages.{s}.{j}.pointwise_conv{k}.{p}' for s, j in replaced
        for k in (1, 2) for p in ('weight', 'bias'))
    assert sorted(missing) == sorted(
        f'stages.{s}.{j}.moe.{p}' for s, j in replaced
        for p in ('router.weight', 'experts.w1', 'experts.b1', 'experts.w2',
                  'experts.b2'))
    for stage, index in replaced:
        assert isinstance(model.stages[stage][index], ConvNeXtMoEBlock)
        copy_mlp_into_expert(reference.stages[stage][index],
                             model.stages[stage][index])
    assert isinstance(model.stages[2][1], ConvNeXtBlock)
    x = images()
    with torch.no_grad():
        expected = reference(x)[0]
        out = model(x)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The same in training mode, with gradients through the experts.
    model.train()
    reference.train()
    x.requires_grad_(True)
    torch.testing.assert_close(
        model(x)[0], reference(x)[0], rtol=1e-5, atol=1e-5)


def test_moe_block_against_hand_written_forward():
    model = moe(moe_blocks=[[], [], [1], []])
    block = model.stages[2][1]
    with torch.no_grad():
        block.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = block.depthwise_conv(x)
        tokens = F.layer_norm(
            y.permute(0, 2, 3, 1), (32, ), block.norm.weight,
            block.norm.bias, eps=1e-6).reshape(2, 4, 32)
        mixed = block.moe(tokens).reshape(2, 2, 2, 32).permute(0, 3, 1, 2)
        expected = x + mixed * block.gamma.view(1, -1, 1, 1)
        torch.testing.assert_close(block(x), expected)


def test_per_stage_moe_cfg_and_num_tokens():
    calls = []

    @MODELS.register_module(force=True)
    class RecordingMoE(torch.nn.Module):

        def __init__(self, embed_dims, feedforward_channels, num_experts,
                     num_tokens=None, act='gelu_tanh'):
            super().__init__()
            calls.append((embed_dims, feedforward_channels, num_experts,
                          num_tokens, act))
            self.fc = torch.nn.Linear(embed_dims, embed_dims)
            self.moe_metrics = {}

        def forward(self, x):
            return self.fc(x)

    try:
        model = ConvNeXtMoE(
            arch=ARCH,
            img_size=64,
            moe_blocks=[[], [], [-2, -1], 'all'],
            moe_cfg=[
                None, None,
                dict(type='RecordingMoE', num_experts=6),
                dict(type='RecordingMoE', num_experts=3)
            ])
    finally:
        MODELS.module_dict.pop('RecordingMoE')
    # 64 px, stem 4: stage 2 is 4x4 = 16 tokens, stage 3 is 2x2 = 4.
    assert calls == [(32, 128, 6, 16, 'gelu'), (32, 128, 6, 16, 'gelu'),
                     (48, 192, 3, 4, 'gelu'), (48, 192, 3, 4, 'gelu')]
    assert model.moe_blocks == [[], [], [1, 2], [0, 1]]
    out = model(torch.randn(1, 3, 64, 64))
    assert out[0].shape == (1, 48)


def test_c_jetmoe_f_layout():
    # Spec 02: 1-based blocks 10..18 of (3, 3, 9, 3) = stage 3 blocks 3..8
    # and all of stage 4; thin channels keep the 98 experts cheap.
    model = ConvNeXtMoE(
        arch=dict(depths=[3, 3, 9, 3], channels=[8, 8, 8, 8]),
        moe_blocks=[[], [], [3, 4, 5, 6, 7, 8], 'all'],
        moe_cfg=[
            None, None,
            dict(type='SparseMoE', num_experts=98),
            dict(type='SparseMoE', num_experts=24)
        ])
    flat = [
        sum(model.depths[:s]) + j + 1
        for s, blocks in enumerate(model.moe_blocks) for j in blocks
    ]
    assert flat == list(range(10, 19))
    assert [type(b) for b in model.stages[2]
            ] == [ConvNeXtBlock] * 3 + [ConvNeXtMoEBlock] * 6
    assert {b.moe.num_experts for b in model.stages[2][3:]} == {98}
    assert {b.moe.num_experts for b in model.stages[3]} == {24}
    assert model.stages[2][3].moe.experts.w1.shape == (98, 8, 32)


def test_every_parameter_gets_a_gradient():
    model = moe(moe_blocks=[[0], [], [1], 'all'])
    model.train()
    out = model(images())[0]
    # A plain sum of LayerNorm outputs would not depend on the input.
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
     ).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_frozen_stages_cover_moe_blocks():
    model = moe(moe_blocks=[[0], [0], [], []], frozen_stages=2)
    assert model.train() is model
    for name, param in model.named_parameters():
        frozen = name.startswith(('stages.0', 'stages.1',
                                  'downsample_layers.0',
                                  'downsample_layers.1'))
        assert param.requires_grad != frozen, name
    assert not model.stages[1][0].moe.training
    assert model.stages[2].training


def test_get_layer_depth_routing_at_top_experts_at_block():
    model = moe(moe_blocks=[[], [], [2], [1]])
    reference = dense()
    num = reference.get_layer_depth('backbone.norm3.weight', 'backbone.')[1]
    for name, _ in model.named_parameters():
        depth = model.get_layer_depth('backbone.' + name, 'backbone.')
        if '.moe.' in name and '.experts.' not in name:
            assert depth == (num - 1, num), name
        elif '.moe.experts.' in name:
            block = name.split('.moe.')[0] + '.pointwise_conv1.weight'
            assert depth == reference.get_layer_depth(
                'backbone.' + block, 'backbone.'), name
        else:
            assert depth == reference.get_layer_depth(
                'backbone.' + name, 'backbone.'), name
    head_depth = model.get_layer_depth('head.fc.weight', 'backbone.')
    assert head_depth == (num - 1, num)


def test_layer_decay_constructor_groups():
    from mmpretrain.engine.optimizers import \
        LearningRateDecayOptimWrapperConstructor
    model = MODELS.build(
        dict(
            type='MoEImageClassifier',
            backbone=dict(
                type='ConvNeXtMoE',
                arch=ARCH,
                img_size=32,
                moe_blocks=[[], [], [2], []],
                moe_cfg=MOE_CFG),
            neck=None,
            head=dict(type='LinearClsHead', num_classes=3, in_channels=48)))
    constructor = LearningRateDecayOptimWrapperConstructor(
        dict(optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.05)),
        dict(layer_decay_rate=0.5))
    wrapper = constructor(model)
    lr = {}
    for group in wrapper.optimizer.param_groups:
        for param in group['params']:
            lr[id(param)] = group['lr']
    moe_block = model.backbone.stages[2][2].moe
    stem = model.backbone.downsample_layers[0][0].weight
    # Stage 2 has 3 blocks: depths 0..6 in the backbone, 8 layers in all;
    # block 2 of stage 2 is at depth 3 + 2 // 3 = 3, the router at 7.
    assert lr[id(moe_block.router.weight)] == 1.0
    assert lr[id(model.head.fc.weight)] == 1.0
    assert lr[id(moe_block.experts.w1)] == 0.5**(8 - 3 - 1)
    assert lr[id(stem)] == 0.5**7


@pytest.mark.parametrize('kwargs, pattern', [
    (dict(moe_blocks=[[0], [], []]), r'one entry per stage \(4 stages\)'),
    (dict(moe_blocks='all'), 'one entry per stage'),
    (dict(moe_blocks=[[], [], [3], []]),
     r'`moe_blocks\[2\]` has block index 3, but stage 2 has 3 blocks'),
    (dict(moe_blocks=[[], [-2], [], []]), r'stage 1 has 1 blocks'),
    (dict(moe_blocks=[[], [], [True], []]), 'block index True'),
    (dict(moe_blocks=[[], [], 'last', []]), r'`moe_blocks\[2\]` must be'),
    (dict(moe_blocks=[[], [], [0], []], moe_cfg=[None] * 4),
     r'`moe_cfg\[2\]` is None but `moe_blocks\[2\]` selects blocks \[0\]'),
    (dict(moe_blocks=[[], [], [0], []], moe_cfg=[MOE_CFG] * 3),
     r'one dict \(or None\) per stage \(4 stages\)'),
    (dict(moe_blocks=[[], [], [0], []], moe_cfg=[None, None, 'x', None]),
     r'`moe_cfg\[2\]` must be a dict'),
    (dict(moe_blocks=[[], [], [0], []], moe_cfg=dict(type='NoSuchMoE')),
     "type='NoSuchMoE'"),
    (dict(img_size=0), '`img_size` must be'),
])
def test_errors(kwargs, pattern):
    cfg = dict(arch=ARCH, moe_cfg=MOE_CFG)
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        ConvNeXtMoE(**cfg)


def test_parse_moe_blocks():
    assert parse_moe_blocks(None, [2, 3]) == [[], []]
    parsed = parse_moe_blocks([[1, -2, 1], 'all'], [2, 3])
    assert parsed == [[0, 1], [0, 1, 2]]


def test_registered_and_builds_from_config():
    model = MODELS.build(
        dict(
            type='ConvNeXtMoE',
            arch=ARCH,
            img_size=32,
            moe_blocks=[[], [], [0], []],
            moe_cfg=MOE_CFG))
    assert isinstance(model, ConvNeXtMoE)


def test_builds_on_meta_device():
    with torch.device('meta'):
        model = ConvNeXtMoE(
            arch=ARCH, moe_blocks=[[], [], [0], []], moe_cfg=MOE_CFG)
    devices = {param.device.type for param in model.parameters()}
    assert devices == {'meta'}


@pytest.mark.parametrize('approximate', ['none', 'tanh'])
def test_experts_take_the_dense_blocks_activation(approximate):
    act_cfg = dict(type='GELU', approximate=approximate)
    model = moe(moe_blocks=[[], [], [0], []], act_cfg=act_cfg)
    assert model.stages[2][1].act.approximate == approximate
    assert model.stages[2][0].moe.experts.act.approximate == approximate
