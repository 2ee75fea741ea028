"""Expert-parallel training through tools/dist_train.sh (gloo, 2 processes)
against one process, resumed across world sizes, and evaluated in one
process with tools/test.py.

2 processes x 4 images and 1 process x 8 images see the same global batch
at every step (as in ``test_resume_and_ddp.py``), so with correct gradients
(dense ones averaged by DDP, expert ones by ``MoEDistributedDataParallel``)
the runs end with the same weights.
"""
import os.path as osp
import re
import shutil
import sys

import pytest

from ..test_tools import (REPO_ROOT, assert_nested_close, free_port,
                          load_run_checkpoint, run_tool, train)

EP = 'model.backbone.moe_cfg.expert_parallel=True'
#: Validation at the end, so that the run logs an accuracy; gradients
#: clipped (by the norm of the whole model's gradient, on every rank).
OPTIONS = ('train_cfg.val_interval=6', 'optim_wrapper.clip_grad.max_norm=0.05')


def dist_train(config, work_dir, *extra, options=()):
    return run_tool([
        osp.join(REPO_ROOT, 'tools', 'dist_train.sh'), config, '2',
        '--work-dir', str(work_dir), *extra, '--cfg-options', EP, *OPTIONS,
        *options
    ], env=dict(PYTHON=sys.executable, PORT=str(free_port())))


def single_train(config, work_dir, *extra):
    return train(config, work_dir, *extra, '--cfg-options', *OPTIONS,
                 'train_dataloader.batch_size=8')


def weights(work_dir, iters=6):
    return load_run_checkpoint(osp.join(work_dir,
                                        f'iter_{iters}.pth'))['state_dict']


def assert_ep_close(actual, expected, path='checkpoint'):
    """Equal up to float32 round-off, as amplified by AdamW.

    The key part of ``qkv.bias`` has a gradient of exactly 0 in exact
    arithmetic (softmax ignores a shift) and of round-off size in practice;
    Adam normalises it into steps of up to ``lr``. Both runs add their
    expert outputs in another order, so those entries drift by ~1e-6 over 6
    steps; a wrong gradient moves weights by ~lr = 1e-3.
    """
    assert_nested_close(actual, expected, path, rtol=1e-4, atol=1e-5)


def accuracy(log):
    found = re.findall(r'accuracy/top1: ([0-9.]+)', log)
    assert found, log[-3000:]
    return float(found[-1])


@pytest.fixture(scope='module')
def runs(tiny_moe_config, tmp_path_factory):
    root = tmp_path_factory.mktemp('ep_runs')
    ep_log = dist_train(tiny_moe_config, root / 'ep')
    single_train(tiny_moe_config, root / 'single')
    return root, ep_log


def test_ep_run_shards_and_saves_every_expert(runs):
    root, log = runs
    assert 'Distributed training: True' in log
    # Each of the 2 ranks held 2 of the 4 experts ...
    assert 'experts 0..1 of 4, rank 0 of 2' in log
    # ... and the checkpoint holds all 4, weights and Adam moments.
    checkpoint = load_run_checkpoint(root / 'ep' / 'iter_6.pth')
    key = 'backbone.layers.1.ffn.experts.w1'
    assert checkpoint['state_dict'][key].shape == (4, 32, 64)
    moments = [
        state['exp_avg'].shape
        for state in checkpoint['optimizer']['state'].values()
    ]
    assert (4, 32, 64) in moments and (2, 32, 64) not in moments


def test_ep_two_processes_equal_one_process(runs):
    root, _ = runs
    ep, single = weights(root / 'ep'), weights(root / 'single')
    assert_ep_close(ep, single)
    start = weights(root / 'single', 2)
    assert any(not (start[k] == single[k]).all() for k in single)
    assert_ep_close(
        load_run_checkpoint(root / 'ep' / 'iter_6.pth')['optimizer'],
        load_run_checkpoint(root / 'single' / 'iter_6.pth')['optimizer'])


def test_ep_checkpoint_resumes_on_one_process(runs, tiny_moe_config,
                                              tmp_path):
    root, _ = runs
    shutil.copy(root / 'ep' / 'iter_4.pth', tmp_path / 'iter_4.pth')
    log = single_train(tiny_moe_config, tmp_path, '--resume',
                       str(tmp_path / 'iter_4.pth'))
    assert 'resumed epoch: 0, iter: 4' in log
    assert_ep_close(weights(tmp_path), weights(root / 'ep'))


def test_one_process_checkpoint_resumes_with_ep(runs, tiny_moe_config,
                                                tmp_path):
    root, _ = runs
    shutil.copy(root / 'single' / 'iter_4.pth', tmp_path / 'iter_4.pth')
    log = dist_train(tiny_moe_config, tmp_path, '--resume',
                     str(tmp_path / 'iter_4.pth'))
    assert 'resumed epoch: 0, iter: 4' in log
    assert_ep_close(weights(tmp_path), weights(root / 'single'))


def test_ep_checkpoint_evaluates_in_one_process(runs, tiny_moe_config,
                                                tmp_path):
    root, ep_log = runs
    log = run_tool([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'test.py'), tiny_moe_config,
        str(root / 'ep' / 'iter_6.pth'), '--work-dir',
        str(tmp_path)
    ])
    assert accuracy(log) == accuracy(ep_log)


def test_best_checkpoint_of_an_ep_run_holds_every_expert(tiny_moe_config,
                                                         tmp_path):
    # The best checkpoint is written after a validation, not by interval.
    dist_train(tiny_moe_config, tmp_path, options=(
        'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
        'default_hooks.checkpoint.interval=100',
        'default_hooks.checkpoint.save_last=False',
        'default_hooks.checkpoint.save_best=accuracy/top1'))
    best = list(tmp_path.glob('best_accuracy_top1_iter_*.pth'))
    assert len(best) == 1, list(tmp_path.iterdir())
    checkpoint = load_run_checkpoint(best[0])
    key = 'backbone.layers.1.ffn.experts.w1'
    assert checkpoint['state_dict'][key].shape == (4, 32, 64)
