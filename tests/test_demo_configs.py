"""Every CPU demo config in ``configs/demo/`` trains through tools/train.py
and its loss falls.

Each config runs for a few iterations at a constant learning rate on the
digits image folder (written once per session), without validation.
"""
import glob
import json
import os.path as osp
import sys

import numpy as np
import pytest

from .test_tools import run_tool

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CONFIGS = sorted(
    osp.relpath(p, REPO_ROOT)
    for p in glob.glob(osp.join(REPO_ROOT, 'configs', 'demo', '*.py')))

#: Short, constant-lr, iteration-based training on top of a demo config.
SHORT_RUN = """
_base_ = [{config!r}]
train_dataloader = dict(dataset=dict(data_root={root!r}))
val_dataloader = dict(dataset=dict(data_root={root!r}))
test_dataloader = val_dataloader
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop',
                 max_iters={iters}, val_interval=100000)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100000))
randomness = dict(seed=0)
"""
ITERS = 40


@pytest.fixture(scope='session')
def digits_root(tmp_path_factory):
    from moe_plugin.datasets import prepare_digits
    return prepare_digits(str(tmp_path_factory.mktemp('digits') / 'digits'))


def read_losses(work_dir):
    """The ``loss`` of every logged training iteration, in order."""
    (scalars, ) = glob.glob(osp.join(work_dir, '*', 'vis_data',
                                     'scalars.json'))
    with open(scalars) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row['loss'] for row in rows if 'loss' in row]


def test_demo_configs_are_found():
    assert 'configs/demo/vmoe-demo_2xb64_digits.py' in DEMO_CONFIGS


@pytest.mark.parametrize('path', DEMO_CONFIGS)
def test_demo_config_trains_and_loss_falls(path, digits_root, tmp_path):
    config = tmp_path / 'short.py'
    config.write_text(
        SHORT_RUN.format(
            config=osp.join(REPO_ROOT, path), root=digits_root, iters=ITERS))
    work_dir = tmp_path / 'work'
    run_tool([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'train.py'),
        str(config), '--work-dir',
        str(work_dir), '--no-validate'
    ])
    losses = read_losses(str(work_dir))
    assert len(losses) == ITERS
    assert np.isfinite(losses).all()
    # The last quarter's mean loss clearly below the first quarter's (the
    # batch-to-batch spread near initialisation is about 0.01).
    quarter = ITERS // 4
    first, last = np.mean(losses[:quarter]), np.mean(losses[-quarter:])
    assert last < first - 0.05, (path, losses)
