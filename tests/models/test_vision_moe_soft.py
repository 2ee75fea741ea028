"""VisionMoE with the soft layers: placement, token count and drop path
handed to the layers, MoE Jetpack's pooling against timm, layer decay."""
import pytest
import timm
import torch
from mmpretrain.engine.optimizers import \
    LearningRateDecayOptimWrapperConstructor
from mmpretrain.registry import MODELS

import moe_plugin  # noqa: F401
from moe_plugin.layers import SoftMoE, SpheroMoE
from moe_plugin.models import VisionMoE, parse_moe_layers

ARCH = dict(embed_dims=32, num_layers=4, num_heads=2, feedforward_channels=64)
SPHERO = dict(type='SpheroMoE', num_experts=3, num_universal_experts=6,
              noise_mult=0.0)


def tiny(**kwargs):
    cfg = dict(arch=ARCH, img_size=32, patch_size=8, act='gelu')
    cfg.update(kwargs)
    torch.manual_seed(0)
    model = VisionMoE(**cfg)
    model.init_weights()
    return model


@pytest.mark.parametrize('spec,num_layers,expected', [
    ('last-6-blocks', 12, [6, 7, 8, 9, 10, 11]),
    ('last-1-blocks', 4, [3]),
    ('last-4-blocks', 4, [0, 1, 2, 3]),
])
def test_last_n_consecutive_blocks(spec, num_layers, expected):
    assert parse_moe_layers(spec, num_layers) == expected


@pytest.mark.parametrize('spec,match', [
    ('last-5-blocks', "asks for 5 blocks but the model has 4"),
    ('every-2-blocks', "'last-<n>-blocks'"),
    ('last-0-blocks', 'needs n >= 1'),
])
def test_bad_block_spelling(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_moe_layers(spec, 4)


def test_soft_moe_gets_the_token_count():
    # 32 px / patch 8 = 16 patches + class token = 17 tokens;
    # round(17 * 1.0 / 4) = 4 slots per expert.
    model = tiny(moe_layers='last-2-blocks',
                 moe_cfg=dict(type='SoftMoE', num_experts=4,
                              capacity_factor=1.0))
    layers = [m for m in model.modules() if isinstance(m, SoftMoE)]
    assert len(layers) == 2 and model.moe_layers == (2, 3)
    assert all(layer.slots_per_expert == 4 for layer in layers)
    out = model(torch.randn(2, 3, 32, 32))[0]
    out.square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name


def test_moe_drop_path_grows_with_depth():
    model = tiny(moe_layers='last-2-blocks', moe_cfg=SPHERO,
                 moe_drop_path_rate=0.3)
    rates = [m.drop_path.drop_prob for m in model.modules()
             if isinstance(m, SpheroMoE)]
    # linspace(0, 0.3, 4)[2:] = 0.2, 0.3
    assert rates == pytest.approx([0.2, 0.3])
    with pytest.raises(ValueError, match='moe_drop_path_rate'):
        tiny(moe_cfg=SPHERO, moe_drop_path_rate=1.0)


def timm_to_mmpretrain(state):
    """timm ViT keys -> MMPretrain ``VisionTransformer`` keys (by hand)."""
    out = {}
    for key, value in state.items():
        new = key.replace('patch_embed.proj', 'patch_embed.projection')
        new = new.replace('blocks.', 'layers.').replace('.norm1', '.ln1')
        new = new.replace('.norm2', '.ln2')
        new = new.replace('.mlp.fc1', '.ffn.layers.0.0')
        new = new.replace('.mlp.fc2', '.ffn.layers.1')
        new = new.replace('fc_norm', 'ln2')
        if not new.startswith('head'):
            out[new] = value
    return out


def test_mean_pooling_with_fc_norm_equals_timm_global_pool_avg():
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
        mlp_ratio=2.0, num_classes=5, global_pool='avg', fc_norm=True).eval()
    for param in reference.parameters():  # nothing left at its init value
        param.data.normal_(std=0.1)
    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='VisionMoE', arch=ARCH, img_size=32, patch_size=8,
                      moe_layers=[], act='gelu', out_type='avg_featmap',
                      final_norm=False),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=32))).eval()
    model.backbone.load_state_dict(
        timm_to_mmpretrain(reference.state_dict()), strict=True)
    model.head.fc.load_state_dict(reference.head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x, mode='tensor'), reference(x),
                               rtol=1e-5, atol=1e-5)


def test_layer_decay_puts_routing_on_top_and_skips_decay():
    model = MODELS.build(dict(
        type='MoEImageClassifier',
        backbone=dict(type='VisionMoE', arch=ARCH, img_size=32, patch_size=8,
                      moe_layers='last-2-blocks', moe_cfg=SPHERO,
                      out_type='avg_featmap', final_norm=False),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=32)))
    constructor = LearningRateDecayOptimWrapperConstructor(
        dict(optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.05)),
        dict(layer_decay_rate=0.5, norm_decay_mult=0.0, bias_decay_mult=0.0,
             custom_keys={'.pos_embed': dict(decay_mult=0.0),
                          '.cls_token': dict(decay_mult=0.0),
                          '.ffn.scales': dict(decay_mult=0.0)}))
    groups = {g['param_name']: g
              for g in constructor(model).optimizer.param_groups}
    # 4 blocks: depths 0 (embeddings) .. 5 (top), lr = 0.5 ** (5 - depth).
    lr = {name: group['lr'] for name, group in groups.items()}
    assert lr['backbone.patch_embed.projection.weight'] == 0.5**5
    assert lr['backbone.pos_embed'] == 0.5**5
    for name in ('backbone.layers.2.ffn.phi', 'backbone.layers.3.ffn.phi',
                 'backbone.layers.2.ffn.scales.0',
                 'backbone.layers.2.ffn.slot_norm.weight', 'head.fc.weight'):
        assert lr[name] == 1.0, name
    assert lr['backbone.layers.2.ffn.core_experts.w1'] == 0.5**2
    assert lr['backbone.layers.3.ffn.univ_experts.w2'] == 0.5
    assert lr['backbone.layers.2.attn.qkv.weight'] == 0.5**2
    assert min(lr.values()) == 0.5**5
    decay = {name: group['weight_decay'] for name, group in groups.items()}
    for name in ('backbone.pos_embed', 'backbone.layers.2.ffn.scales.0',
                 'backbone.layers.2.ffn.scales.1'):
        assert decay[name] == 0.0, name
    assert decay['backbone.layers.2.ffn.core_experts.w1'] == 0.05
    assert decay['backbone.layers.2.ffn.phi'] == 0.05
