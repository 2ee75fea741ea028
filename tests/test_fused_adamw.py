"""``AdamW(fused=True)`` (the configs' schedules) gives the weights of
torch's default AdamW to round-off: with layer-wise lr decay, gradient
clipping, a gradient scaler under autocast and expert parallelism."""
import copy
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper as _build_optim_wrapper
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS

import moe_plugin  # noqa: F401

from .test_tools import REPO_ROOT, assert_nested_close

ARCH = dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64)
SPHERO = dict(type='SpheroMoE', num_experts=3, num_universal_experts=6,
              combine='entmax15', noise_mult=0.0)
SCHEDULES = sorted(
    glob.glob(osp.join(REPO_ROOT, 'configs', '_base_', 'schedules',
                       '*adamw*.py')))


def build_optim_wrapper(model, cfg):
    """MMEngine's builder in MMPretrain's scope (its layer-decay
    constructor), as the runner does."""
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return _build_optim_wrapper(model, cfg)


def tiny_classifier(dtype, device):
    torch.manual_seed(0)
    model = MODELS.build(dict(
        type='MoEImageClassifier',
        backbone=dict(type='VisionMoE', arch=ARCH, img_size=16, patch_size=4,
                      moe_layers='last-1-blocks', moe_cfg=SPHERO,
                      out_type='avg_featmap', final_norm=False),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=32)))
    model.init_weights()
    return model.to(device=device, dtype=dtype).train()


def batch(dtype, device):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 16, 16, generator=gen, dtype=dtype)
    return images.to(device), torch.tensor([0, 1, 2, 3], device=device)


def layer_decay_wrapper(model, fused, clip):
    """MoE Jetpack's schedule (layer decay 0.6, no decay on norms, biases,
    temperatures) with a clipping norm small enough to act every step."""
    return build_optim_wrapper(model, dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.05,
                       fused=fused),
        constructor='LearningRateDecayOptimWrapperConstructor',
        paramwise_cfg=dict(layer_decay_rate=0.6, norm_decay_mult=0.0,
                           bias_decay_mult=0.0,
                           custom_keys={'.ffn.scales': dict(decay_mult=0.0)}),
        clip_grad=clip))


def loss_of(model, images, labels):
    scores = model(images, mode='tensor')
    return torch.nn.functional.cross_entropy(scores.float(), labels)


@pytest.mark.parametrize('clip', [None, dict(max_norm=0.05)])
def test_fused_equals_default_with_layer_decay_and_clipping(clip, device):
    """float64: the two differ only by the order of a few operations."""
    images, labels = batch(torch.float64, device)
    models, wrappers = [], []
    for fused in (True, None):
        model = tiny_classifier(torch.float64, device)
        models.append(model)
        wrappers.append(layer_decay_wrapper(model, fused, clip))
    assert wrappers[0].optimizer.defaults['fused'] is True
    assert len({g['lr'] for g in wrappers[0].param_groups}) > 2
    for _ in range(4):
        for model, wrapper in zip(models, wrappers):
            wrapper.update_params(loss_of(model, images, labels))
    start = tiny_classifier(torch.float64, device).state_dict()
    fused, default = (m.state_dict() for m in models)
    assert any(not torch.equal(fused[k], start[k]) for k in start)
    assert_nested_close(fused, default, 'weights', rtol=1e-10, atol=1e-12)
    states = [w.optimizer.state_dict()['state'] for w in wrappers]
    assert_nested_close(states[0], states[1], 'adam', rtol=1e-9, atol=1e-14)


def test_fused_equals_default_under_autocast_with_a_grad_scaler(device):
    """float32 weights, low-precision autocast and torch's GradScaler (what
    MMEngine's AmpOptimWrapper wraps); the fused step unscales inside."""
    images, labels = batch(torch.float32, device)
    low = torch.bfloat16 if device.type == 'cpu' else torch.float16
    runs = []
    for fused in (True, None):
        model = tiny_classifier(torch.float32, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2,
                                      fused=fused)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
        for _ in range(3):
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=low):
                loss = loss_of(model, images, labels)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            scaler.step(optimizer)
            scaler.update()
        runs.append(model.state_dict())
    # Adam divides by the root of the second moment, so round-off of a
    # gradient near zero grows to up to ~lr: a loose float32 tolerance.
    assert_nested_close(runs[0], runs[1], 'weights', rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('path', SCHEDULES, ids=osp.basename)
def test_schedules_build_a_fused_adamw(path):
    optim_cfg = Config.fromfile(path).optim_wrapper
    assert optim_cfg.optimizer.fused is True
    if optim_cfg.get('type') == 'AmpOptimWrapper':
        optim_cfg.type = 'OptimWrapper'  # MMEngine's needs a GPU
    model = tiny_classifier(torch.float32, 'cpu')
    wrapper = build_optim_wrapper(model, copy.deepcopy(optim_cfg))
    assert isinstance(wrapper.optimizer, torch.optim.AdamW)
    assert wrapper.optimizer.defaults['fused'] is True
    wrapper.update_params(loss_of(model, *batch(torch.float32, 'cpu')))


def test_fused_adamw_with_expert_parallelism(tiny_moe_config, tmp_path):
    """2 expert-parallel processes with the fused AdamW end where one
    process with the default one does (tiny V-MoE, gloo)."""
    from .distributed.test_expert_parallel_training import (assert_ep_close,
                                                            dist_train,
                                                            single_train,
                                                            weights)
    dist_train(tiny_moe_config, tmp_path / 'ep',
               options=('optim_wrapper.optimizer.fused=True', ))
    single_train(tiny_moe_config, tmp_path / 'single')
    assert_ep_close(weights(tmp_path / 'ep'), weights(tmp_path / 'single'))
