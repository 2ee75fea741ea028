"""tools/train.py, tools/test.py and tools/dist_train.sh, run for real.

Every test starts the tools as subprocesses with this interpreter, on the
tiny config and image folder of ``conftest.py``.
"""
import json
import os
import os.path as osp
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_plugin.compat import run_checkpoint_scope

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run_tool(args, timeout=240, env=None):
    """Run a command from the repository root; fail with its output."""
    full_env = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}))
    proc = subprocess.run(
        args,
        cwd=REPO_ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f'{args} exited {proc.returncode}:\n'
                    f'{proc.stdout[-6000:]}')
    return proc.stdout


def train(config, work_dir, *extra):
    return run_tool([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'train.py'), config, '--work-dir',
        str(work_dir), *extra
    ])


def load_run_checkpoint(path):
    with run_checkpoint_scope():
        return torch.load(path, map_location='cpu', weights_only=True)


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def assert_nested_close(actual, expected, path='checkpoint'):
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(
            actual, expected, rtol=1e-5, atol=1e-6, msg=path)
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_nested_close(actual[key], expected[key], f'{path}.{key}')
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_nested_close(a, e, f'{path}[{i}]')
    else:
        assert actual == expected, path


def test_interrupted_training_resumes_like_uninterrupted(
        tiny_moe_config, tmp_path):
    # Reference: 6 iterations in one go.
    train(tiny_moe_config, tmp_path / 'full')
    # Interrupted after iteration 4 (its last checkpoint), then resumed
    # from the work directory's latest checkpoint up to iteration 6.
    train(tiny_moe_config, tmp_path / 'split', '--cfg-options',
          'train_cfg.max_iters=4')
    assert sorted(os.listdir(tmp_path / 'split')).count('iter_4.pth') == 1
    assert not osp.exists(tmp_path / 'split' / 'iter_6.pth')
    log = train(tiny_moe_config, tmp_path / 'split', '--resume')
    assert 'resumed epoch: 0, iter: 4' in log
    assert f'checkpoint: {tmp_path / "split" / "iter_6.pth"}' in log

    full = load_run_checkpoint(tmp_path / 'full' / 'iter_6.pth')
    resumed = load_run_checkpoint(tmp_path / 'split' / 'iter_6.pth')
    assert resumed['meta']['iter'] == full['meta']['iter'] == 6
    # Same weights, same Adam moments and step counts, same scheduler
    # position: the resumed run continued exactly where it stopped.
    assert_nested_close(resumed['state_dict'], full['state_dict'])
    assert_nested_close(resumed['optimizer']['state'],
                        full['optimizer']['state'])
    assert resumed['optimizer']['param_groups'][0]['lr'] == pytest.approx(
        full['optimizer']['param_groups'][0]['lr'])
    assert_nested_close(resumed['param_schedulers'],
                        full['param_schedulers'])
    assert resumed['param_schedulers'][0]['_global_step'] == 6
    # The resumed message hub holds the losses of iterations 1..4 (from the
    # interrupted run) and 5..6, equal to the uninterrupted run's.
    resumed_losses = resumed['message_hub']['log_scalars']['train/loss'].data
    full_losses = full['message_hub']['log_scalars']['train/loss'].data
    assert len(resumed_losses[0]) == 6
    np.testing.assert_allclose(
        resumed_losses[0], full_losses[0], rtol=1e-5, atol=1e-6)


def test_dist_train_two_cpu_processes(tiny_moe_config, tmp_path):
    work_dir = tmp_path / 'ddp'
    command = [
        osp.join(REPO_ROOT, 'tools', 'dist_train.sh'), tiny_moe_config, '2',
        '--work-dir',
        str(work_dir), '--cfg-options', 'train_cfg.max_iters=4'
    ]
    log = run_tool(
        command, env=dict(PYTHON=sys.executable, PORT=str(free_port())))
    assert 'Distributed training: True' in log
    assert "type='MMDistributedDataParallel'" in log
    assert 'find_unused_parameters' not in log
    checkpoint = load_run_checkpoint(work_dir / 'iter_4.pth')
    assert checkpoint['meta']['iter'] == 4


def test_test_tool_changes_eval_routing(tiny_moe_config, tiny_image_folder,
                                        tmp_path):
    from mmengine.config import Config
    from mmpretrain.registry import MODELS
    from PIL import Image

    from moe_plugin.layers import SparseMoE, set_eval_routing

    train(tiny_moe_config, tmp_path / 'run', '--cfg-options',
          'train_cfg.max_iters=2')
    checkpoint = str(tmp_path / 'run' / 'iter_2.pth')
    out = tmp_path / 'metrics.json'
    log = run_tool([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'test.py'), tiny_moe_config, checkpoint,
        '--work-dir',
        str(tmp_path / 'test'), '--eval-capacity-factor', '0.25',
        '--eval-batch-priority', 'on', '--out',
        str(out), '--out-item', 'metrics'
    ])
    assert 'Test-time routing of 1 MoE layers' in log
    accuracy = json.loads(out.read_text())['accuracy/top1']

    # Independent reference: the same weights and routing, run in-process.
    cfg = Config.fromfile(tiny_moe_config)
    model = MODELS.build(cfg.model).eval()
    model.load_state_dict(load_run_checkpoint(checkpoint)['state_dict'])
    assert set_eval_routing(
        model, capacity_factor=0.25, batch_priority=True) == 1
    moe = [m for m in model.modules() if isinstance(m, SparseMoE)][0]
    assert moe.eval_capacity_factor == 0.25 and moe.eval_batch_priority
    correct = total = 0
    for label, cls in enumerate(('a', 'b')):
        folder = osp.join(tiny_image_folder, 'val', cls)
        for name in sorted(os.listdir(folder)):
            img = torch.from_numpy(
                np.array(Image.open(osp.join(folder, name)).convert('RGB')))
            x = (img.permute(2, 0, 1).float()[None] - 127.5) / 127.5
            with torch.no_grad():
                pred = model(x, mode='tensor').argmax(-1).item()
            correct += int(pred == label)
            total += 1
    assert accuracy == pytest.approx(100.0 * correct / total)
