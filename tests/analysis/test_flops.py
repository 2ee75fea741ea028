"""FLOPs and parameters: a dense ViT against torch.utils.flop_counter, a
tiny MoE against a hand count."""
import json
from functools import partial

import pytest
import torch
from mmpretrain.models import VisionTransformer
from mmpretrain.models.utils.attention import (
    MultiheadAttention, scaled_dot_product_attention_pyimpl)
from torch.utils.flop_counter import FlopCounterMode

import moe_plugin  # noqa: F401
from moe_plugin.analysis.flops import attention_flops, count_flops
from moe_plugin.models import VisionMoE

from .helpers import load_tool


def test_dense_vit_matches_flop_counter_with_explicit_attention():
    torch.manual_seed(0)
    model = VisionTransformer(
        arch=dict(embed_dims=32, num_layers=3, num_heads=4,
                  feedforward_channels=64), img_size=24, patch_size=4)
    model.eval()
    x = torch.randn(2, 3, 24, 24)
    figures = count_flops(model, x)
    # Reference: the same model with attention as explicit matmuls, which
    # the counter sees; every figure per image.
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            module.scaled_dot_product_attention = partial(
                scaled_dot_product_attention_pyimpl)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert figures['flops']['total'] == counter.get_total_flops() / 2
    assert figures['flops']['dense'] == figures['flops']['total']
    assert figures['flops']['moe'] == 0
    # 3 blocks of 37 tokens, 4 heads of 8 dims: 2 * 4 * 37^2 * 16 each.
    assert figures['flops']['attention_analytic'] == 3 * 2 * 4 * 37**2 * 16
    params = sum(p.numel() for p in model.parameters())
    assert figures['params'] == dict(
        total=params, active=params, dense=params, moe=0, moe_active=0)


def tiny_moe(**moe_cfg):
    torch.manual_seed(0)
    cfg = dict(type='SparseMoE', num_experts=4, top_k=2, capacity_factor=1.0)
    cfg.update(moe_cfg)
    model = VisionMoE(
        arch=dict(embed_dims=8, num_layers=1, num_heads=2,
                  feedforward_channels=16),
        img_size=8, patch_size=4, moe_layers=[0], moe_cfg=cfg)
    model.eval()
    return model


def test_tiny_moe_active_flops_match_hand_count():
    model = tiny_moe()
    figures = count_flops(model, torch.randn(3, 3, 8, 8))
    # N = 4 patches + cls = 5 tokens, D = 8, H = 16, E = 4, K = 2, c = 1:
    # B = ceil(5 * 2 * 1 / 4) = 3 -> 4 (multiple of 4), 16 slots.
    patch_embed = 2 * 4 * 8 * (3 * 4 * 4)        # 3072
    qkv = 2 * 5 * 8 * 24                           # 1920
    proj = 2 * 5 * 8 * 8                           # 640
    attention = 2 * 2 * 5 * 5 * (4 + 4)           # 800: 2 heads of 4
    router = 2 * 5 * 8 * 4                         # 320
    experts = 16 * 2 * (8 * 16 + 16 * 8)           # 8192: all 16 slots
    combine = 2 * 5 * 2 * 8                        # 160
    (layer, ) = figures['layers']
    assert layer['capacity'] == 4
    assert (layer['slots'], layer['assignments'],
            layer['padding_slots']) == (16, 10, 6)
    assert layer['flops_router'] == router
    assert layer['flops_experts'] == experts
    assert layer['flops_padding'] == 6 * 2 * (8 * 16 + 16 * 8)
    assert layer['flops_combine'] == combine
    assert figures['flops']['moe'] == router + experts + combine
    assert figures['flops']['dense'] == patch_embed + qkv + proj + attention
    assert figures['flops']['total'] == 15104
    # Parameters: an expert has 8*16 + 16 + 16*8 + 8 = 280, the router 32;
    # a token uses K = 2 of the 4 experts.
    total = sum(p.numel() for p in model.parameters())
    assert figures['params']['moe'] == 4 * 280 + 32
    assert figures['params']['moe_active'] == 2 * 280 + 32
    assert figures['params']['active'] == total - 2 * 280


def test_expert_choice_and_eval_capacity():
    # Expert choice, eval capacity 2: B = ceil(5 * 2 / 4) = 3 -> 4 slots
    # per expert, 16 slots for 5 tokens (3.2 experts per token).
    model = tiny_moe(router='expert_choice', eval_capacity_factor=2.0)
    (layer, ) = count_flops(model, torch.randn(1, 3, 8, 8))['layers']
    assert layer['kind'] == 'expert_choice'
    assert layer['capacity'] == 4
    assert layer['experts_per_token'] == pytest.approx(16 / 5)
    assert layer['flops_combine'] == 0
    assert layer['active_params'] == pytest.approx(32 + 16 / 5 * 280)


def test_attention_flops_formula():
    q = torch.zeros(2, 3, 5, 4)
    v = torch.zeros(2, 3, 7, 6)
    assert attention_flops(q, torch.zeros(2, 3, 7, 4), v) == \
        2 * 6 * 5 * 7 * (4 + 6)


def test_cli_writes_json_and_refuses_to_overwrite(tiny_moe_config, tmp_path,
                                                  capsys):
    get_flops = load_tool('get_flops')
    out = tmp_path / 'flops.json'
    result = get_flops.main([tiny_moe_config, '--json', str(out)])
    printed = capsys.readouterr().out
    assert 'layers.1.ffn (token choice, E=4, K=2, B=12, S=17)' in printed
    saved = json.loads(out.read_text())
    assert saved['model']['flops'] == result['model']['flops']
    assert saved['model']['shape'] == [16, 16]
    with pytest.raises(FileExistsError, match='--force'):
        get_flops.main([tiny_moe_config, '--json', str(out)])
    with pytest.raises(SystemExit):
        get_flops.main([tiny_moe_config, '--shape', '0'])


def test_attention_pool_head_is_counted_and_grad_flags_kept():
    """out_type='map' (timm's attention pool, whose latent query parameter
    is a submodule's direct input) counts the pool on top of the same
    backbone with a class token, and leaves requires_grad as it was."""
    def build(out_type):
        torch.manual_seed(0)
        return VisionMoE(
            arch=dict(embed_dims=16, num_layers=2, num_heads=2,
                      feedforward_channels=32),
            img_size=16, patch_size=8, out_type=out_type, moe_layers=[1],
            moe_cfg=dict(type='SpheroMoE', num_experts=2,
                         num_universal_experts=2))

    pooled, plain = build('map'), build('cls_token')
    assert pooled.eval() is pooled and plain.eval() is plain
    pooled.pos_embed.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16)
    figures = count_flops(pooled, x)
    reference = count_flops(plain, x)
    assert figures['flops']['moe'] == reference['flops']['moe'] > 0
    assert figures['flops']['total'] > reference['flops']['total']
    assert not pooled.pos_embed.requires_grad
    assert all(p.requires_grad for n, p in pooled.named_parameters()
               if n != 'pos_embed')
