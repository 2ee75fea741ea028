"""Channel selection (a dense ViT wider than the target) and MoE Jetpack's
original trunk layout: the residual stream against a reference whose
LayerNorms see the kept channels only, exact slices at the reported
indices, the channel and head rankings, the CLI and bad input."""
import copy
import json
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmpretrain.registry import MODELS
from test_recycling import (REPO_ROOT, TARGET_CONFIG, images,
                            randomize_routers, timm_vit, write_image_folder)
from torch import nn

import moe_plugin  # noqa: F401
from moe_plugin.recycling import (build_dense_vit, calibrate, recycle,
                                  recycle_backbone)
from moe_plugin.recycling.formats import timm_to_canonical

WIDE, NARROW, HEAD_DIM, HIDDEN, CLASSES = 64, 32, 16, 64, 5
#: The wide model's live heads per block (the others are zeroed).
LIVE_HEADS = {0: [1, 3], 1: [0, 2]}


def kept_channels():
    rng = np.random.default_rng(7)
    return np.sort(rng.choice(WIDE, NARROW, replace=False))


def wide_vit_with_dead_channels():
    """A ViT of width 64 whose residual stream is exactly zero outside 32
    channels and whose heads outside ``LIVE_HEADS`` output nothing."""
    model = timm_vit(dim=WIDE, heads=WIDE // HEAD_DIM, seed=3)
    dead = torch.ones(WIDE, dtype=torch.bool)
    dead[torch.as_tensor(kept_channels())] = False
    with torch.no_grad():
        model.patch_embed.proj.weight[dead] = 0
        model.patch_embed.proj.bias[dead] = 0
        model.cls_token[..., dead] = 0
        model.pos_embed[..., dead] = 0
        for i, block in enumerate(model.blocks):
            for norm in (block.norm1, block.norm2):
                norm.weight[dead] = 0
                norm.bias[dead] = 0
            qkv, proj = block.attn.qkv, block.attn.proj
            qkv.weight[:, dead] = 0
            for h in range(WIDE // HEAD_DIM):
                if h in LIVE_HEADS[i]:
                    continue
                cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                for j in range(3):
                    rows = slice(j * WIDE + h * HEAD_DIM,
                                 j * WIDE + (h + 1) * HEAD_DIM)
                    qkv.weight[rows] = 0
                    qkv.bias[rows] = 0
                proj.weight[:, cols] = 0
            proj.weight[dead] = 0
            proj.bias[dead] = 0
            block.mlp.fc1.weight[:, dead] = 0
            block.mlp.fc2.weight[dead] = 0
            block.mlp.fc2.bias[dead] = 0
        model.norm.weight[dead] = 0
        model.norm.bias[dead] = 0
        model.head.weight[:, dead] = 0
    return model


class KeptChannelsLayerNorm(nn.Module):
    """LayerNorm whose mean and variance are over the kept channels only;
    zero elsewhere (what a narrowed model computes)."""

    def __init__(self, norm: nn.LayerNorm, kept: np.ndarray):
        super().__init__()
        self.norm, self.kept = norm, torch.as_tensor(kept)

    def forward(self, x):
        out = torch.zeros_like(x)
        out[..., self.kept] = F.layer_norm(
            x[..., self.kept], (len(self.kept), ),
            self.norm.weight[self.kept], self.norm.bias[self.kept],
            self.norm.eps)
        return out


def reference_with_kept_layernorms(model):
    model, kept = copy.deepcopy(model), kept_channels()
    for block in model.blocks:
        block.norm1 = KeptChannelsLayerNorm(block.norm1, kept)
        block.norm2 = KeptChannelsLayerNorm(block.norm2, kept)
    model.norm = KeptChannelsLayerNorm(model.norm, kept)
    return model


def narrow_moe(expert_width=HIDDEN, moe_layers='every-1', init_cfg=None,
               **moe):
    moe_cfg = dict(type='SparseMoE', num_experts=4, top_k=2,
                   renormalize=True, capacity_factor=4.0,
                   capacity_multiple_of=1, feedforward_channels=expert_width)
    moe_cfg.update(moe)
    torch.manual_seed(1)
    model = MODELS.build(
        dict(type='MoEImageClassifier',
             backbone=dict(type='VisionMoE',
                           arch=dict(embed_dims=NARROW, num_layers=2,
                                     num_heads=NARROW // HEAD_DIM,
                                     feedforward_channels=HIDDEN),
                           img_size=32, patch_size=8, act='gelu',
                           moe_layers=moe_layers, moe_cfg=moe_cfg,
                           init_cfg=init_cfg),
             head=dict(type='LinearClsHead', num_classes=CLASSES,
                       in_channels=NARROW))).eval()
    model.init_weights()
    return model


@pytest.fixture(scope='module')
def wide():
    model = wide_vit_with_dead_channels()
    return model, timm_to_canonical(model.state_dict())


def test_channel_selection_keeps_the_residual_stream(wide):
    model, dense = wide
    moe = narrow_moe()
    state, report = recycle(dense, moe, method='upcycle')
    moe.load_state_dict(state, strict=True)
    randomize_routers(moe)
    # Ranked by LayerNorm gains: the dead channels and heads are last.
    assert report['channels'] == kept_channels().tolist()
    assert report['heads'] == {f'layers.{b}': h for b, h in
                               LIVE_HEADS.items()}
    assert report['channel_scores'] == 'layernorm gains'
    assert 'head.fc.weight' in report['copied']
    x = images()
    expected = reference_with_kept_layernorms(model)(x)
    torch.testing.assert_close(moe(x, mode='tensor'), expected, rtol=1e-4,
                               atol=1e-5)


def test_config_only_route_narrows_a_wider_checkpoint(wide, tmp_path):
    model, dense = wide
    torch.save(model.state_dict(), tmp_path / 'wide.pth')
    moe = narrow_moe(init_cfg=dict(type='RecycleDenseInit',
                                   checkpoint=str(tmp_path / 'wide.pth')))
    state, _ = recycle_backbone(dense, narrow_moe().backbone)
    for key, value in moe.backbone.state_dict().items():
        if 'router' not in key:
            assert torch.equal(value, state[key]), key


def test_calibrated_channel_selection_takes_exact_slices(wide):
    _, dense = wide
    moe = narrow_moe(expert_width=32)
    dense_model = build_dense_vit(dense, moe.backbone, WIDE // HEAD_DIM)
    batches = [torch.randn(4, 3, 32, 32,
                           generator=torch.Generator().manual_seed(s))
               for s in range(2)]
    stats = calibrate(dense_model, batches, [0, 1], channels=True)
    assert stats[0]['embed']['l2'].shape == (WIDE, )
    state, report = recycle_backbone(dense, moe.backbone,
                                     method='importance', stats=stats,
                                     seed=3)
    assert report['channel_scores'] == 'calibration l2'
    assert report['channels'] == kept_channels().tolist()
    assert report['heads'] == {f'layers.{b}': h for b, h in
                               LIVE_HEADS.items()}
    c = torch.as_tensor(report['channels'])
    assert torch.equal(state['patch_embed.projection.weight'],
                       dense.state['patch_embed.projection.weight'][c])
    assert torch.equal(state['pos_embed'], dense.state['pos_embed'][..., c])
    for i in range(2):
        heads = report['heads'][f'layers.{i}']
        head_ch = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                             for h in heads])
        rows = torch.cat([head_ch + j * WIDE for j in range(3)])
        qkv = dense.state[f'layers.{i}.attn.qkv.weight']
        assert torch.equal(state[f'layers.{i}.attn.qkv.weight'],
                           qkv[rows][:, c])
        proj = dense.state[f'layers.{i}.attn.proj.weight']
        assert torch.equal(state[f'layers.{i}.attn.proj.weight'],
                           proj[c][:, head_ch])
        fc1_w, fc1_b, fc2_w, fc2_b = dense.fc(i)
        for e, idx in enumerate(report['experts'][f'layers.{i}']['experts']):
            assert len(idx) == 32
            assert torch.equal(state[f'layers.{i}.ffn.experts.w1'][e],
                               fc1_w[idx][:, c].T)
            assert torch.equal(state[f'layers.{i}.ffn.experts.w2'][e],
                               fc2_w[c][:, idx].T)
            assert torch.equal(state[f'layers.{i}.ffn.experts.b2'][e],
                               fc2_b[c])


def test_random_and_uniform_channels_and_narrower_dense_blocks(wide):
    _, dense = wide
    moe = narrow_moe(expert_width=32, moe_layers=[1])  # block 0 dense
    target = moe.backbone
    uniform, report = recycle_backbone(dense, target, method='uniform')
    assert report['channels'] == list(range(0, WIDE, 2))
    assert report['hidden'] == {}  # block 0 keeps its 64 neurons
    random_a, report_a = recycle_backbone(dense, target, method='random',
                                          seed=5)
    random_b, report_b = recycle_backbone(dense, target, method='random',
                                          seed=5)
    assert report_a['channels'] == report_b['channels'] != report[
        'channels']
    assert torch.equal(random_a['layers.1.ffn.experts.w1'],
                       random_b['layers.1.ffn.experts.w1'])
    # A target dense block narrower than the dense MLP: sampled neurons.
    narrower = MODELS.build(
        dict(type='VisionMoE',
             arch=dict(embed_dims=NARROW, num_layers=2, num_heads=2,
                       feedforward_channels=32), img_size=32, patch_size=8,
             moe_layers=[1],
             moe_cfg=dict(type='SparseMoE', num_experts=4, top_k=2,
                          feedforward_channels=HIDDEN)))
    state, report = recycle_backbone(dense, narrower, method='random')
    idx = report['hidden']['layers.0']
    assert len(set(idx)) == 32
    c = torch.as_tensor(report['channels'])
    assert torch.equal(state['layers.0.ffn.layers.0.0.weight'],
                       dense.fc(0)[0][idx][:, c])
    assert torch.equal(state['layers.0.ffn.layers.1.weight'],
                       dense.fc(0)[2][c][:, idx])
    with pytest.raises(ValueError, match=r'layers.0.ffn: the target MLP has '
                       '32 hidden neurons, the dense one 64; upcycling'):
        recycle_backbone(dense, narrower, method='upcycle')


def test_trunk_layout_takes_experts_with_their_own_channels(wide):
    _, dense = wide
    trunk_model = timm_vit(dim=NARROW, heads=NARROW // HEAD_DIM, seed=9)
    trunk = timm_to_canonical(trunk_model.state_dict())
    moe = narrow_moe(expert_width=16)
    state, report = recycle(dense, moe, method='random', seed=2,
                            trunk=trunk)
    moe.load_state_dict(state, strict=True)
    for key, value in trunk.state.items():
        if '.ffn.' not in key:
            assert torch.equal(state[f'backbone.{key}'], value), key
    assert torch.equal(state['head.fc.weight'], trunk.head['weight'])
    for i in range(2):
        fc1_w, fc1_b, fc2_w, fc2_b = dense.fc(i)
        neurons = report['experts'][f'layers.{i}']['experts']
        channels = report['expert_channels'][f'layers.{i}']['experts']
        assert len({tuple(c) for c in channels}) == 4  # independent
        prefix = f'backbone.layers.{i}.ffn.experts.'
        for e, (n, c) in enumerate(zip(neurons, channels)):
            assert len(c) == NARROW and len(set(c)) == NARROW
            assert torch.equal(state[prefix + 'w1'][e], fc1_w[n][:, c].T)
            assert torch.equal(state[prefix + 'b1'][e], fc1_b[n])
            assert torch.equal(state[prefix + 'w2'][e], fc2_w[c][:, n].T)
            assert torch.equal(state[prefix + 'b2'][e], fc2_b[c])
    assert 'backbone.layers.0.ffn.layers.0.0.weight' not in report['copied']
    assert 'layers.0.ffn.layers.0.0.weight' in report['unused']


def test_channel_selection_bad_input(wide, tmp_path):
    _, dense = wide
    narrow = timm_to_canonical(timm_vit(dim=16, heads=1).state_dict())
    with pytest.raises(ValueError, match=r'\(16, 3, 8, 8\) vs model '
                       r'\(32, 3, 8, 8\) \(width mismatch\) \(a narrower '
                       'dense model cannot be recycled\\)'):
        recycle(narrow, narrow_moe())
    with pytest.raises(ValueError, match='head width must match: dense 64 / '
                       '2 heads = 32, target 16'):
        recycle(dense, narrow_moe(), dense_heads=2)
    with pytest.raises(ValueError, match='dense width 64 is not a multiple '
                       'of the target head width 24'):
        target = MODELS.build(
            dict(type='VisionMoE', arch=dict(embed_dims=48, num_layers=2,
                                             num_heads=2,
                                             feedforward_channels=HIDDEN),
                 img_size=32, patch_size=8, moe_layers='every-1',
                 moe_cfg=dict(type='SparseMoE', num_experts=4, top_k=2)))
        recycle_backbone(dense, target)


def test_cli_channel_selection_and_trunk(wide, tmp_path):
    model, _ = wide
    torch.save(model.state_dict(), tmp_path / 'wide.pth')
    torch.save(timm_vit().state_dict(), tmp_path / 'narrow.pth')
    folder = write_image_folder(str(tmp_path / 'calib'))
    config = tmp_path / 'target.py'
    config.write_text(TARGET_CONFIG)
    tool = osp.join(REPO_ROOT, 'tools', 'gen_weight', 'gen_vit_moe_weight.py')
    base = [sys.executable, tool, str(config), '--dense',
            str(tmp_path / 'wide.pth'), '--method', 'importance',
            '--calib-data', folder, '--num-calib-images', '6']
    proc = subprocess.run(base + ['--out', str(tmp_path / 'cs.pth')],
                          cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'channels: 32 of 64 kept for the whole model (ranked by ' \
        'calibration l2), heads chosen whole (4 dense)' in proc.stdout
    report = json.loads((tmp_path / 'cs.json').read_text())
    assert report['channels'] == kept_channels().tolist()
    proc = subprocess.run(
        base + ['--trunk', str(tmp_path / 'narrow.pth'), '--out',
                str(tmp_path / 'trunk.pth')], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'layout:  trunk from' in proc.stdout
    report = json.loads((tmp_path / 'trunk.json').read_text())
    assert report['trunk']['format'] == 'timm'
    assert np.shape(report['expert_channels']['layers.0']['experts']) == (4,
                                                                          32)
    state = torch.load(tmp_path / 'trunk.pth', weights_only=True)[
        'state_dict']
    assert torch.equal(state['backbone.pos_embed'],
                       timm_vit().state_dict()['pos_embed'])
