"""Runs of tools/train.py and tools/dist_train.sh compared for real:
resuming with randomness on, resuming after SIGKILL, and 2-process DDP
against 1 process over the same global batch."""
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest
import torch

from .test_tools import (REPO_ROOT, TIMEOUT, assert_nested_close, free_port,
                         load_run_checkpoint, run_tool, train)

#: Router noise, expert dropout, drop path and random augmentation on top
#: of the tiny config of conftest.py.
RANDOM_CONFIG = """
_base_ = [{base!r}]
model = dict(backbone=dict(
    drop_path_rate=0.1,
    moe_cfg=dict(noise_std=1.0, expert_drop=0.1)))
train_dataloader = dict(dataset=dict(pipeline=[
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=16, crop_ratio_range=(0.5, 1.0),
         backend='pillow'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]))
"""


@pytest.fixture(scope='module')
def random_config(tiny_moe_config, tmp_path_factory):
    path = tmp_path_factory.mktemp('random') / 'vmoe-tiny-random.py'
    path.write_text(RANDOM_CONFIG.format(base=tiny_moe_config))
    return str(path)


def final_weights(work_dir, iters=6):
    return load_run_checkpoint(osp.join(work_dir,
                                        f'iter_{iters}.pth'))['state_dict']


def interrupted_and_resumed(config, work_dir):
    train(config, work_dir, '--cfg-options', 'train_cfg.max_iters=4')
    log = train(config, work_dir, '--resume')
    assert 'resumed epoch: 0, iter: 4' in log
    return final_weights(work_dir)


def test_resume_with_randomness_equals_uninterrupted(random_config,
                                                     tmp_path):
    full = tmp_path / 'full'
    train(random_config, full)
    checkpoint = load_run_checkpoint(full / 'iter_4.pth')
    assert len(checkpoint['rng_states']) == 1
    resumed = interrupted_and_resumed(random_config, tmp_path / 'split')
    assert_nested_close(resumed, final_weights(full))

    # Control: from a checkpoint without the random states the random
    # streams restart on resume and the weights differ (so the comparison
    # above can fail).
    control = tmp_path / 'control'
    train(random_config, control, '--cfg-options', 'train_cfg.max_iters=4')
    stripped = load_run_checkpoint(control / 'iter_4.pth')
    del stripped['rng_states']
    torch.save(stripped, control / 'iter_4.pth')
    log = train(random_config, control, '--resume')
    assert 'holds no random states' in log
    other = final_weights(control)
    reference = final_weights(full)
    assert any(not torch.allclose(other[k], reference[k]) for k in reference)


def test_run_killed_after_a_checkpoint_resumes_from_it(random_config,
                                                       tmp_path):
    work_dir = tmp_path / 'killed'
    last = work_dir / 'last_checkpoint'
    proc = subprocess.Popen(
        [
            sys.executable,
            osp.join(REPO_ROOT, 'tools', 'train.py'), random_config,
            '--work-dir',
            str(work_dir), '--cfg-options', 'train_cfg.max_iters=100000'
        ],
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS='1'),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not last.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, 'no checkpoint written'
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # `last_checkpoint` is written after the checkpoint itself is complete.
    checkpoint = last.read_text().strip()
    step = int(osp.basename(checkpoint)[len('iter_'):-len('.pth')])
    assert step >= 2 and step % 2 == 0
    log = train(random_config, work_dir, '--resume', '--cfg-options',
                f'train_cfg.max_iters={step + 2}')
    assert f'resumed epoch: 0, iter: {step}' in log
    assert load_run_checkpoint(work_dir / f'iter_{step + 2}.pth')['meta'][
        'iter'] == step + 2


#: Saves every rank's weights at the end of training, for the DDP test.
RANK_DUMP_HOOK = """
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmpretrain.registry import HOOKS


@HOOKS.register_module()
class RankWeightsDumpHook(Hook):
    def after_train(self, runner):
        model = runner.model
        if is_model_wrapper(model):
            model = model.module
        torch.save(model.state_dict(),
                   f'{runner.work_dir}/rank{get_rank()}_weights.pth')
"""


def test_ddp_two_processes_equal_one_process_on_the_global_batch(
        tiny_moe_config, tmp_path):
    (tmp_path / 'rank_dump_hook.py').write_text(RANK_DUMP_HOOK)
    config = tmp_path / 'vmoe-tiny-dump.py'
    config.write_text(
        f'_base_ = [{tiny_moe_config!r}]\n'
        "custom_imports = dict(imports=['moe_plugin', 'rank_dump_hook'])\n"
        "custom_hooks = [dict(type='RankWeightsDumpHook')]\n")
    options = ['--cfg-options', 'train_cfg.max_iters=4']
    env = dict(PYTHON=sys.executable, PORT=str(free_port()),
               PYTHONPATH=str(tmp_path))
    # 2 processes x 4 images: the sampler gives rank r the shuffled indices
    # r, r + 2, ..., so each step's union is the 1-process batch of 8.
    ddp = tmp_path / 'ddp'
    log = run_tool([
        osp.join(REPO_ROOT, 'tools', 'dist_train.sh'), str(config), '2',
        '--work-dir', str(ddp), *options
    ], env=env)
    assert 'Distributed training: True' in log
    single = tmp_path / 'single'
    run_tool([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'train.py'), str(config),
        '--work-dir', str(single), *options,
        'train_dataloader.batch_size=8'
    ], env=env)
    rank0 = torch.load(ddp / 'rank0_weights.pth', weights_only=True)
    rank1 = torch.load(ddp / 'rank1_weights.pth', weights_only=True)
    one = torch.load(single / 'rank0_weights.pth', weights_only=True)
    for key in one:
        assert torch.equal(rank0[key], rank1[key]), key
    assert_nested_close(rank0, one)
    # Each rank's random states were gathered into the checkpoint.
    states = load_run_checkpoint(ddp / 'iter_4.pth')['rng_states']
    assert len(states) == 2
    # The weights moved: equality is not that of untrained models.
    initial = load_run_checkpoint(ddp / 'iter_2.pth')['state_dict']
    assert any(not torch.allclose(initial[k], one[k]) for k in one)
