"""Detectors and segmentors with MoE backbones: the auxiliary loss reaches
the loss dict and the routers, a few iterations train through MMEngine's
runner, recycled weights load strictly."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

import moe_plugin  # noqa: F401
from moe_plugin.engine import add_moe_aux_loss
from moe_plugin.layers import find_moe_modules

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = osp.join(REPO_ROOT, 'configs', 'demo', 'dense')
DET = osp.join(DEMO, 'mask-rcnn_vmoe-pyramid_2xb4_digit-canvas.py')
SEG = osp.join(DEMO, 'upernet_vmoe-pyramid_2xb4_digit-canvas.py')


def tiny_config(path, canvas_root, checkpoint, work_dir):
    """The demo config on the tiny canvas set, 2 iterations, no val."""
    cfg = Config.fromfile(path)
    root = canvas_root + '/'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = root
    if cfg.get('val_evaluator', {}).get('ann_file'):
        cfg.val_evaluator.ann_file = root + 'annotations/val.json'
        cfg.test_evaluator = cfg.val_evaluator
    cfg.model.backbone.init_cfg.checkpoint = checkpoint
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2,
                         val_interval=100)
    cfg.param_scheduler = []
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=100)
    cfg.work_dir = str(work_dir)
    return cfg


def first_batch(runner):
    data = next(iter(runner.train_dataloader))
    return runner.model.data_preprocessor(data, True)


@pytest.mark.parametrize('path', [DET, SEG], ids=['mask-rcnn', 'upernet'])
def test_runner_trains_and_logs_the_aux_loss(path, canvas_root,
                                             dense_vit_checkpoint, tmp_path):
    """A few iterations through the toolbox's runner; MoEAuxLossHook puts
    loss_moe_aux (and routing statistics) into the detector's / segmentor's
    losses, and the aux loss alone moves the routers."""
    from mmengine.runner import Runner
    cfg = tiny_config(path, canvas_root, dense_vit_checkpoint, tmp_path)
    runner = Runner.from_cfg(cfg)
    runner.train()
    logged = runner.message_hub.log_scalars
    assert 'train/loss_moe_aux' in logged and 'train/moe_dropped' in logged
    assert torch.isfinite(torch.tensor(
        logged['train/loss'].current())).all()

    # MoEAuxLossHook removed its forward hook after training.
    model = runner.model
    add_moe_aux_loss(model)
    losses = model(**first_batch(runner), mode='loss')
    assert losses['loss_moe_aux'] > 0
    model.zero_grad()
    losses['loss_moe_aux'].backward()
    routers = [m.router.weight for _, m in find_moe_modules(model)]
    assert routers and all(r.grad is not None and r.grad.abs().sum() > 0
                           for r in routers)


def test_aux_loss_without_the_runner(canvas_root, dense_vit_checkpoint,
                                     tmp_path):
    """add_moe_aux_loss on a bare detector: the dict gains loss_moe_aux
    equal to V-MoE's weighted importance + load losses; removing the handle
    takes it away; predictions are untouched."""
    cfg = tiny_config(DET, canvas_root, dense_vit_checkpoint, tmp_path)
    cfg.model.backbone.moe_cfg.noise_std = 1.0
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg)
    data = runner.model.data_preprocessor(
        next(iter(runner.train_dataloader)), True)
    handle = add_moe_aux_loss(model)
    losses = model(**data, mode='loss')
    expected = sum(
        0.005 * (m.moe_metrics['importance_loss'] +
                 m.moe_metrics['load_loss'])
        for _, m in find_moe_modules(model))
    torch.testing.assert_close(losses['loss_moe_aux'], expected)
    handle.remove()
    assert 'loss_moe_aux' not in model(**data, mode='loss')


def test_weight_tool_on_a_detection_config(dense_vit_checkpoint, tmp_path):
    """gen_vit_moe_weight.py given a Mask R-CNN config: the output loads
    strictly into the detector; the backbone's dense tensors are the
    checkpoint's, its experts copies of the dense MLPs."""
    import sys
    sys.path.insert(0, osp.join(REPO_ROOT, 'tools', 'gen_weight'))
    from gen_vit_moe_weight import main
    out = tmp_path / 'det_upcycled.pth'
    main([DET, '--dense', dense_vit_checkpoint, '--out', str(out)])
    cfg = Config.fromfile(DET)
    cfg.model.backbone.pop('init_cfg')
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    state = torch.load(str(out))['state_dict']
    model.load_state_dict(state, strict=True)
    dense = torch.load(dense_vit_checkpoint)['state_dict']
    torch.testing.assert_close(state['backbone.layers.2.attn.qkv.weight'],
                               dense['backbone.layers.2.attn.qkv.weight'])
    w1 = state['backbone.layers.1.ffn.experts.w1']
    fc1 = dense['backbone.layers.1.ffn.layers.0.0.weight']
    for expert in w1:
        torch.testing.assert_close(expert, fc1.t())


def test_detector_trains_alike_with_expert_parallelism(
        canvas_root, dense_vit_checkpoint, tmp_path):
    """Mask R-CNN with the MoE backbone on 2 processes (tools/dist_train.sh,
    gloo): expert parallelism (each rank holds 2 of the 4 experts) ends
    with the weights of plain DDP, and its checkpoint holds every expert.
    SGD rather than the config's AdamW: Adam's first steps turn round-off
    in near-zero gradients into whole lr-sized updates."""
    import sys

    from ..test_tools import (assert_nested_close, free_port,
                              load_run_checkpoint, run_tool)
    cfg = tiny_config(DET, canvas_root, dense_vit_checkpoint, tmp_path)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1,
                                        by_epoch=False)
    cfg.optim_wrapper.optimizer = dict(type='SGD', lr=0.01)
    config = tmp_path / 'det.py'
    cfg.dump(str(config))
    states = {}
    for name, options in (('ddp', []), ('ep', [
            '--cfg-options', 'model.backbone.moe_cfg.expert_parallel=True'
    ])):
        work_dir = tmp_path / name
        log = run_tool([
            osp.join(REPO_ROOT, 'tools', 'dist_train.sh'),
            str(config), '2', '--work-dir',
            str(work_dir), *options
        ], env=dict(PYTHON=sys.executable, PORT=str(free_port())))
        assert 'Distributed training: True' in log
        states[name] = load_run_checkpoint(work_dir /
                                           'iter_2.pth')['state_dict']
    moved = load_run_checkpoint(work_dir / 'iter_1.pth')['state_dict']
    w1 = 'backbone.layers.1.ffn.experts.w1'
    assert states['ep'][w1].shape[0] == 4
    assert set(states['ep']) == set(states['ddp'])
    assert_nested_close(states['ep'], states['ddp'], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(moved[w1], states['ep'][w1])
