"""MoE backbones for MMDetection / MMSegmentation: shapes against the dense
backbones those toolboxes use, upcycling, recycling and bad input."""
import sys

import pytest
import torch

import moe_plugin  # noqa: F401
from moe_plugin.models.dense import VisionMoEPyramid, require

VIT = dict(embed_dims=64, num_layers=4, num_heads=4, feedforward_channels=128)
CONVNEXT = dict(depths=[1, 1, 2, 1], channels=[16, 32, 64, 128])
# Top-2 of 4 identical experts, renormalised, room for every token: an
# upcycled MoE computes its dense MLP exactly.
UPCYCLED = dict(type='SparseMoE', num_experts=4, top_k=2, renormalize=True,
                capacity_factor=4.0, eval_capacity_factor=4.0, noise_std=0.0)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vision_moe_maps_match_mmseg_vit():
    """``VisionMoE(out_type='featmap')`` gives MMSegmentation's ViT maps:
    same count, shapes and stride for the same out_indices."""
    from mmseg.models.backbones import VisionTransformer
    ref = VisionTransformer(img_size=64, patch_size=16, embed_dims=64,
                            num_layers=4, num_heads=4, mlp_ratio=2,
                            out_indices=(1, 3))
    from moe_plugin.models import VisionMoE
    ours = VisionMoE(arch=VIT, img_size=64, patch_size=16,
                     out_type='featmap', out_indices=(1, 3),
                     moe_layers=[1, 3],
                     moe_cfg=dict(type='SparseMoE', num_experts=4))
    x = torch.randn(2, 3, 64, 96)
    expected = [tuple(t.shape) for t in ref(x)]
    assert [tuple(t.shape) for t in ours(x)] == expected == [(2, 64, 4, 6)
                                                             ] * 2


def test_pyramid_strides_and_channels():
    """ViTDet's simple pyramid: strides 4, 8, 16, 32 for patch 16, channels
    D/4, D/2, D, D; one map per scale from one index per scale."""
    model = VisionMoEPyramid(arch=VIT, img_size=64, patch_size=16,
                             moe_layers='every-2',
                             moe_cfg=dict(type='SparseMoE', num_experts=4))
    x = torch.randn(2, 3, 64, 128)
    outs = model(x)
    assert model.out_channels == [16, 32, 64, 64]
    assert [tuple(t.shape) for t in outs] == [(2, 16, 16, 32),
                                              (2, 32, 8, 16), (2, 64, 4, 8),
                                              (2, 64, 2, 4)]
    per_scale = VisionMoEPyramid(arch=VIT, img_size=64, patch_size=16,
                                 out_indices=(0, 1, 2, 3), moe_layers=[])
    assert [t.shape[-1] for t in per_scale(x)] == [32, 16, 8, 4]


def test_convnext_moe_matches_mmpretrain_convnext_shapes():
    """Stage maps of ``ConvNeXtMoE`` as MMPretrain's ConvNeXt in
    MMDetection's configs (out_indices 0-3, no gap)."""
    from mmpretrain.models import ConvNeXt

    from moe_plugin.models import ConvNeXtMoE
    kwargs = dict(arch=CONVNEXT, out_indices=[0, 1, 2, 3],
                  gap_before_final_norm=False)
    ref = ConvNeXt(**kwargs)
    ours = ConvNeXtMoE(moe_blocks=[[], [0], [1], 'all'], img_size=64,
                       moe_cfg=dict(type='SparseMoE', num_experts=4),
                       **kwargs)
    x = torch.randn(2, 3, 64, 96)
    assert [t.shape for t in ours(x)] == [t.shape for t in ref(x)]


def test_upcycled_vit_pyramid_gives_the_dense_features(dense_vit_checkpoint):
    init = dict(type='RecycleDenseInit', checkpoint=dense_vit_checkpoint)
    common = dict(arch=VIT, img_size=96, patch_size=8, act='gelu_tanh')
    dense = VisionMoEPyramid(moe_layers=[], init_cfg=init, **common)
    dense.init_weights()
    moe = VisionMoEPyramid(moe_layers=[1, 3], moe_cfg=UPCYCLED,
                           init_cfg=init, **common)
    moe.init_weights()
    # The pyramid is fresh in both: give the MoE the dense one's.
    moe.pyramid.load_state_dict(dense.pyramid.state_dict())
    dense.eval(), moe.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        for a, b in zip(dense(x), moe(x)):
            close(a, b)
    # The dense blocks are the checkpoint's own (pos_embed resized).
    ckpt = torch.load(dense_vit_checkpoint)['state_dict']
    close(moe.state_dict()['layers.0.attn.qkv.weight'],
          ckpt['backbone.layers.0.attn.qkv.weight'])


def _timm_convnext(tmp_path):
    import timm
    torch.manual_seed(0)
    model = timm.models.ConvNeXt(depths=CONVNEXT['depths'],
                                 dims=CONVNEXT['channels'], num_classes=5)
    for name, param in model.named_parameters():
        if name.endswith('gamma'):  # timm's 1e-6 would hide the MLPs
            param.data.uniform_(0.5, 1.5)
    path = tmp_path / 'convnext_timm.pth'
    torch.save(model.state_dict(), str(path))
    return model.eval(), str(path)


def test_timm_convnext_recycles_into_convnext_moe(tmp_path):
    """timm ConvNeXt -> dense ConvNeXtMoE classifier: timm's logits; the
    upcycled MoE backbone gives the dense backbone's stage maps."""
    from mmpretrain.registry import MODELS

    from moe_plugin.recycling import (load_dense_convnext,
                                      recycle_convnext_model)
    timm_model, path = _timm_convnext(tmp_path)
    classifier = MODELS.build(
        dict(type='ImageClassifier',
             backbone=dict(type='ConvNeXtMoE', arch=CONVNEXT),
             head=dict(type='LinearClsHead', num_classes=5,
                       in_channels=128)))
    state, report = recycle_convnext_model(load_dense_convnext(path),
                                           classifier)
    classifier.load_state_dict(state, strict=True)
    assert 'head.fc.weight' in report['copied'] and not report['unused']
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        close(classifier.eval()(x, mode='tensor'), timm_model(x))

    init = dict(type='RecycleDenseInit', checkpoint=path)
    kwargs = dict(arch=CONVNEXT, out_indices=[0, 1, 2, 3],
                  gap_before_final_norm=False, init_cfg=init)
    from moe_plugin.models import ConvNeXtMoE
    dense = ConvNeXtMoE(**kwargs)
    moe = ConvNeXtMoE(moe_blocks=[[], [0], [1], 'all'], img_size=64,
                      moe_cfg=dict(UPCYCLED, act='gelu'), **kwargs)
    dense.init_weights(), moe.init_weights()
    # norm0-norm2 are new for a detector: fresh in each, made equal here.
    for i in range(3):
        getattr(moe, f'norm{i}').load_state_dict(
            getattr(dense, f'norm{i}').state_dict())
    with torch.no_grad():
        for a, b in zip(dense.eval()(x), moe.eval()(x)):
            close(a, b)


def test_convnext_recycling_refuses_another_arch(tmp_path):
    from moe_plugin.models import ConvNeXtMoE
    from moe_plugin.recycling import load_dense_convnext, recycle_convnext
    _, path = _timm_convnext(tmp_path)
    deeper = ConvNeXtMoE(arch=dict(depths=[1, 1, 3, 1],
                                   channels=CONVNEXT['channels']))
    with pytest.raises(ValueError, match='arch'):
        recycle_convnext(load_dense_convnext(path), deeper)


@pytest.mark.parametrize('build', [
    lambda: VisionMoEPyramid(arch=VIT, img_size=32, patch_size=8,
                             out_indices=4),
    lambda: VisionMoEPyramid(arch=VIT, img_size=32, patch_size=8,
                             out_indices=(0, 1)),
    lambda: __import__('moe_plugin').models.VisionMoE(
        arch=VIT, img_size=32, patch_size=8, out_type='featmap',
        out_indices=(1, 4)),
    lambda: __import__('moe_plugin').models.ConvNeXtMoE(
        arch=CONVNEXT, out_indices=[0, 4]),
])
def test_out_indices_beyond_the_depth_are_refused(build):
    with pytest.raises(ValueError, match='out_indices'):
        build()


def test_moe_neck_keeps_maps_and_checks_width():
    from moe_plugin.models import MoENeck
    neck = MoENeck(in_channels=64, pool=None,
                   moe_cfg=dict(type='SparseMoE', num_experts=4))
    maps = (torch.randn(2, 32, 8, 8), torch.randn(2, 64, 4, 4))
    out = neck(maps)
    assert out[0] is maps[0] and out[1].shape == maps[1].shape
    with pytest.raises(ValueError, match='in_channels=64'):
        neck((torch.randn(2, 48, 4, 4), ))


def test_moe_neck_as_an_extra_stage_of_a_detector_neck():
    """``neck=[MoENeck, FPN]`` builds in MMDetection's scope."""
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
        neck = MODELS.build([
            dict(type='MoENeck', in_channels=64, pool=None,
                 moe_cfg=dict(type='SparseMoE', num_experts=4)),
            dict(type='FPN', in_channels=[32, 64], out_channels=16,
                 num_outs=3)
        ])
    outs = neck((torch.randn(1, 32, 8, 8), torch.randn(1, 64, 4, 4)))
    assert [tuple(t.shape) for t in outs] == [(1, 16, 8, 8), (1, 16, 4, 4),
                                              (1, 16, 2, 2)]


@pytest.mark.no_toolbox
def test_missing_mmdet_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'mmdet.registry', None)
    with pytest.raises(ImportError, match=r"\.\[det\]"):
        require('mmdet')


@pytest.mark.no_toolbox
def test_mmcv_lite_is_a_clear_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, 'find_spec',
        lambda name, *a: None if name == 'mmcv._ext' else real(name, *a))
    try:
        import mmseg.registry  # noqa: F401
    except Exception:
        pytest.skip('mmseg does not import here')
    with pytest.raises(ImportError, match='install_mmcv.sh'):
        require('mmseg')
