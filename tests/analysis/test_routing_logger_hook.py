"""MoERoutingLoggerHook writes the scalars it promises."""
import glob
import json
import math
import os.path as osp
import sys
from types import SimpleNamespace

import pytest
import torch

import moe_plugin  # noqa: F401
from moe_plugin.engine import (MoERoutingLoggerHook,
                               OptionalTensorboardVisBackend)
from moe_plugin.models import VisionMoE

from ..test_tools import REPO_ROOT, run_tool

ARCH = dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64)


class FakeVisualizer:

    def __init__(self):
        self.calls = []

    def add_scalars(self, scalars, step):
        self.calls.append((step, scalars))


def fake_runner(model, iteration):
    return SimpleNamespace(
        model=model,
        iter=iteration,
        visualizer=FakeVisualizer(),
        logger=SimpleNamespace(warning=lambda msg: None))


def test_hook_logs_exact_values_on_its_iterations_only():
    torch.manual_seed(0)
    model = VisionMoE(
        arch=ARCH, img_size=16, patch_size=4, moe_layers=[1],
        moe_cfg=dict(type='SparseMoE', num_experts=4, top_k=1,
                     capacity_factor=1.0, noise_std=1.0))
    model.train()
    layer = model.layers[1].ffn
    # A zero router: every token's gates are uniform, entropy = log 4.
    with torch.no_grad():
        layer.router.weight.zero_()
    hook = MoERoutingLoggerHook(interval=3)
    runner = fake_runner(model, 0)
    hook.before_train(runner)
    x = torch.randn(2, 3, 16, 16)
    for iteration in range(6):
        runner.iter = iteration
        hook.before_train_iter(runner, iteration)
        model(x)
        hook.after_train_iter(runner, iteration)
    # Iterations 3 and 6 (1-based) only; no hook left on the model.
    assert [step for step, _ in runner.visualizer.calls] == [3, 6]
    assert not layer._forward_hooks
    step, scalars = runner.visualizer.calls[-1]
    prefix = 'moe/layers.1.ffn/'
    metrics = layer.moe_metrics
    expected = {f'{prefix}load_{e}': metrics['expert_load'][e].item()
                for e in range(4)}
    expected.update({
        prefix + 'dropped': metrics['dropped_fraction'].item(),
        prefix + 'entropy': math.log(4),
        prefix + 'importance_loss': metrics['importance_loss'].item(),
        prefix + 'load_loss': metrics['load_loss'].item(),
        prefix + 'gshard_loss': metrics['gshard_loss'].item(),
        prefix + 'z_loss': metrics['z_loss'].item(),
    })
    assert set(scalars) == set(expected)
    for key, value in expected.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert sum(scalars[f'{prefix}load_{e}'] for e in range(4)) == \
        pytest.approx(1.0)
    # S = 17 tokens, K = 1, c = 1: capacity 8 (ceil(17/4) = 5 -> 8).
    assert 0.0 <= scalars[prefix + 'dropped'] < 1.0


def test_entropy_of_soft_layer_is_its_combine_entropy():
    torch.manual_seed(0)
    model = VisionMoE(
        arch=ARCH, img_size=16, patch_size=4, moe_layers=[1],
        moe_cfg=dict(type='SpheroMoE', num_experts=2,
                     num_universal_experts=2, slots_per_expert=2))
    model.train()
    layer = model.layers[1].ffn
    seen = {}
    layer.register_forward_pre_hook(
        lambda m, args: seen.setdefault('x', args[0].detach()))
    hook = MoERoutingLoggerHook(interval=1)
    runner = fake_runner(model, 0)
    hook.before_train(runner)
    rng = torch.get_rng_state()
    hook.before_train_iter(runner, 0)
    out = model(torch.randn(2, 3, 16, 16))
    hook.after_train_iter(runner, 0)
    rng_after = torch.get_rng_state()
    # Reference: the noise-free combine weights, summed per expert.
    layer.eval()
    _, combine = layer.routing_weights(seen['x'])
    probs = combine.reshape(2, 17, 4, 2).sum(-1)
    entropy = -(probs * probs.log()).sum(-1).mean().item()
    (_, scalars), = runner.visualizer.calls
    assert scalars['moe/layers.1.ffn/entropy'] == pytest.approx(entropy)
    assert set(scalars) == {f'moe/layers.1.ffn/load_{e}' for e in range(4)
                            } | {'moe/layers.1.ffn/entropy'}
    # The entropy pass drew no random numbers: the training noise and
    # dropout streams are those of a run without the hook.
    layer.train()
    torch.set_rng_state(rng)
    torch.testing.assert_close(model(torch.randn(2, 3, 16, 16)), out)
    assert torch.equal(torch.get_rng_state(), rng_after)


def test_bad_interval():
    with pytest.raises(ValueError, match='interval'):
        MoERoutingLoggerHook(interval=0)


def test_tensorboard_backend_warns_and_does_nothing_without_tensorboard(
        tmp_path, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, 'find_spec', lambda name, *args: None
        if name == 'tensorboard' else find_spec(name, *args))
    with pytest.warns(UserWarning, match=r"moe_plugin\[tensorboard\]"):
        backend = OptionalTensorboardVisBackend(str(tmp_path))
    backend.add_scalars({'a': 1.0}, step=1)
    backend.close()
    assert not backend.available and not list(tmp_path.iterdir())


def test_training_run_writes_the_scalars_json(tiny_moe_config, tmp_path):
    config = tmp_path / 'with_hook.py'
    config.write_text(
        f'_base_ = [{tiny_moe_config!r}]\n'
        "custom_hooks = [dict(type='MoERoutingLoggerHook', interval=2)]\n"
        'visualizer = dict(vis_backends=[dict(type=\'LocalVisBackend\'), '
        "dict(type='OptionalTensorboardVisBackend')])\n")
    run_tool([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'train.py'),
        str(config), '--work-dir',
        str(tmp_path / 'work'), '--no-validate'
    ])
    (path, ) = glob.glob(
        str(tmp_path / 'work' / '*' / 'vis_data' / 'scalars.json'))
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    routing = [row for row in rows if 'moe/layers.1.ffn/entropy' in row]
    # 6 iterations, every 2nd one; the tiny config has no router noise, so
    # no load loss.
    assert [row['step'] for row in routing] == [2, 4, 6]
    expected = {f'moe/layers.1.ffn/{key}' for key in (
        'load_0', 'load_1', 'load_2', 'load_3', 'dropped', 'entropy',
        'importance_loss', 'gshard_loss', 'z_loss')} | {'step'}
    for row in routing:
        assert set(row) == expected
        assert sum(row[f'moe/layers.1.ffn/load_{e}']
                   for e in range(4)) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < row['moe/layers.1.ffn/entropy'] <= math.log(4) + 1e-6
