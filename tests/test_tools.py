"""tools/train.py, tools/test.py and tools/dist_train.sh, run for real.

Every test starts the tools as subprocesses with this interpreter, on the
tiny config and image folder of ``conftest.py``.
"""
import os
import os.path as osp
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_plugin.engine.hooks.portable_checkpoint_hook import from_portable

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


#: Generous: a loaded 2-core machine must not fail a test by being slow.
TIMEOUT = 1800


def run_tool(args, timeout=TIMEOUT, env=None):
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
    """A run checkpoint, read with plain ``weights_only=True`` (no
    allow-list) and its message hub rebuilt."""
    return from_portable(
        torch.load(path, map_location='cpu', weights_only=True))


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def assert_nested_close(actual, expected, path='checkpoint', rtol=1e-5,
                        atol=1e-6):
    """Nested dicts / lists of tensors and values equal (tensors to
    ``rtol`` / ``atol``)."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(
            actual, expected, rtol=rtol, atol=atol, msg=path)
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_nested_close(actual[key], expected[key], f'{path}.{key}',
                                rtol, atol)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_nested_close(a, e, f'{path}[{i}]', rtol, atol)
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


def reference_scores(config, checkpoint, image_folder, routing, options):
    """Class scores of the val images with every SparseMoE replaced by the
    one-hot einsum reference run with ``routing``, in the test loader's
    batches: ``{image path: [classes]}``. ``options`` change the config."""
    import types

    from mmengine.config import Config
    from mmpretrain.registry import MODELS
    from PIL import Image

    from moe_plugin.layers import SparseMoE, einsum_sparse_moe_forward

    cfg = Config.fromfile(config)
    cfg.merge_from_dict(options)
    model = MODELS.build(cfg.model).eval()
    model.load_state_dict(load_run_checkpoint(checkpoint)['state_dict'])
    for layer in model.modules():
        if isinstance(layer, SparseMoE):
            layer.forward = types.MethodType(
                lambda self, x: einsum_sparse_moe_forward(self, x, **routing),
                layer)
    # CustomDataset's order: classes, then file names, sorted.
    paths = [
        osp.join(image_folder, 'val', cls, name) for cls in ('a', 'b')
        for name in sorted(os.listdir(osp.join(image_folder, 'val', cls)))
    ]
    batch_size = cfg.test_dataloader.batch_size
    scores = {}
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        images = torch.stack([
            torch.from_numpy(np.array(Image.open(p).convert('RGB'))).permute(
                2, 0, 1).float() for p in batch
        ])
        with torch.no_grad():
            logits = model((images - 127.5) / 127.5, mode='tensor')
        scores.update(zip(batch, logits.softmax(-1)))
    return scores


def test_test_tool_changes_eval_routing(tiny_moe_config, tiny_image_folder,
                                        tmp_path):
    import pickle

    # The MoE in the first block: in the last one only the class token's
    # routing would reach the logits.
    options = {'model.backbone.moe_layers': [0]}
    train(tiny_moe_config, tmp_path / 'run', '--cfg-options',
          'train_cfg.max_iters=2', 'model.backbone.moe_layers=[0]')
    checkpoint = str(tmp_path / 'run' / 'iter_2.pth')
    out = tmp_path / 'preds.pkl'
    log = run_tool([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'test.py'), tiny_moe_config, checkpoint,
        '--work-dir',
        str(tmp_path / 'test'), '--eval-top-k', '1',
        '--eval-capacity-factor', '0.5', '--eval-batch-priority', 'on',
        '--eval-group-size', '2', '--out',
        str(out), '--cfg-options', 'model.backbone.moe_layers=[0]'
    ])
    assert 'Test-time routing of 1 MoE layers' in log
    with open(out, 'rb') as f:
        tool_scores = {r['img_path']: r['pred_score'] for r in pickle.load(f)}

    # Independent reference: the einsum formulation with the same routing.
    tested = dict(top_k=1, capacity_factor=0.5, batch_priority=True,
                  group_size=2)
    expected = reference_scores(tiny_moe_config, checkpoint,
                                tiny_image_folder, tested, options)
    assert sorted(tool_scores) == sorted(expected)
    for path, score in expected.items():
        torch.testing.assert_close(tool_scores[path], score, msg=path)
    # Each option matters: the config's own routing (per-image groups) or a
    # single option left at its training value gives other scores.
    for changed in (dict(top_k=2), dict(capacity_factor=1.05),
                    dict(batch_priority=False), dict(group_size=None)):
        other = reference_scores(tiny_moe_config, checkpoint,
                                 tiny_image_folder, dict(tested, **changed),
                                 options)
        assert any(not torch.allclose(tool_scores[p], other[p], atol=1e-6)
                   for p in other), changed


def test_test_tool_rejects_a_bad_group_size(tiny_moe_config):
    proc = subprocess.run([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'test.py'), tiny_moe_config, 'x.pth',
        '--eval-group-size', '0'
    ], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=TIMEOUT)
    assert proc.returncode == 2
    assert "--eval-group-size: expected a whole number of images >= 1 or " \
        "'image', got '0'" in proc.stdout
