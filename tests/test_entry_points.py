"""MMPretrain's own entry points on the project's checkpoints, and what a
newcomer meets first: portable run checkpoints, class names in written
weights, the shared runner set-up, argument types, help and one-line errors.
"""
import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from moe_plugin.engine.hooks.portable_checkpoint_hook import (from_portable,
                                                              to_portable)

from .test_tools import REPO_ROOT, TIMEOUT, run_tool, train

MMPRETRAIN_TEST = osp.join(
    osp.dirname(__import__('mmpretrain').__file__), '.mim', 'tools',
    'test.py')


def run(args, **kwargs):
    """A command's process (no failure on a non-zero status)."""
    return subprocess.run(
        args,
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS='1'),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=TIMEOUT,
        **kwargs)


# -- portable checkpoints ----------------------------------------------------
def test_message_hub_round_trip_through_plain_weights_only(tmp_path):
    from mmengine.logging import HistoryBuffer, MessageHub
    hub = MessageHub('portable-test')
    for i, loss in enumerate([0.7, 0.5, 0.25]):
        hub.update_scalar('train/loss', loss, count=i + 1)
    hub.update_info('eta', np.float64(12.5))
    hub.update_info('table', np.arange(6, dtype=np.int32).reshape(2, 3))
    hub.update_info('names', np.array(['a', 'bb']))
    state = hub.state_dict()
    unknown = []
    path = tmp_path / 'hub.pth'
    torch.save({'message_hub': to_portable(state, unknown)}, path)
    assert unknown == []
    # No allow-list: plain weights_only=True.
    loaded = from_portable(torch.load(path, weights_only=True))['message_hub']
    buffer = loaded['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    np.testing.assert_array_equal(buffer.data[0], [0.7, 0.5, 0.25])
    np.testing.assert_array_equal(buffer.data[1], [1, 2, 3])
    # MMEngine's mean: sum of values over sum of counts.
    assert buffer.mean() == pytest.approx(1.45 / 6)
    assert loaded['runtime_info']['eta'] == 12.5
    table = loaded['runtime_info']['table']
    assert table.dtype == np.int32
    assert table.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert loaded['runtime_info']['names'].tolist() == ['a', 'bb']
    resumed = MessageHub('portable-test-2')
    resumed.load_state_dict(loaded)
    assert resumed.get_scalar('train/loss').current() == 0.25


def test_to_portable_names_what_it_cannot_convert():
    unknown = []
    to_portable({'a': {'b': [1, object()]}}, unknown)
    assert unknown == ['a.b[1] (object)']


@pytest.fixture(scope='module')
def run_checkpoint(tiny_moe_config, tmp_path_factory):
    """A 2-iteration run of the tiny config, trained with the MoE Jetpack
    schedule's AmpOptimWrapper (plain OptimWrapper on a CPU)."""
    work_dir = tmp_path_factory.mktemp('entry_run')
    log = train(tiny_moe_config, work_dir, '--cfg-options',
                'train_cfg.max_iters=2', 'optim_wrapper.type=AmpOptimWrapper')
    return str(work_dir / 'iter_2.pth'), log


def test_amp_config_trains_on_cpu_with_one_warning(run_checkpoint):
    if torch.cuda.is_available():
        pytest.skip('the fallback is for machines without a GPU')
    _, log = run_checkpoint
    assert log.count('AmpOptimWrapper replaced by OptimWrapper') == 1


def test_mmpretrain_test_tool_and_inferencer_on_a_run_checkpoint(
        run_checkpoint, tiny_moe_config, tiny_image_folder, tmp_path):
    checkpoint, _ = run_checkpoint
    plain = torch.load(checkpoint, map_location='cpu', weights_only=True)
    assert plain['meta']['dataset_meta']['classes'] == ('a', 'b')

    top1 = {}
    for name, tool in (('ours', osp.join(REPO_ROOT, 'tools', 'test.py')),
                       ('mmpretrain', MMPRETRAIN_TEST)):
        out = tmp_path / f'{name}.json'
        run_tool([
            sys.executable, tool, tiny_moe_config, checkpoint, '--work-dir',
            str(tmp_path / name), '--out',
            str(out), '--out-item', 'metrics'
        ])
        top1[name] = json.loads(out.read_text())['accuracy/top1']
    assert top1['ours'] == top1['mmpretrain']

    from mmpretrain.apis import (ImageClassificationInferencer, get_model,
                                 inference_model)
    image = osp.join(tiny_image_folder, 'val', 'b', '0.png')
    inferencer = ImageClassificationInferencer(
        tiny_moe_config, pretrained=checkpoint)
    result = inferencer(image)[0]
    assert result['pred_class'] == ('a', 'b')[result['pred_label']]
    model = get_model(tiny_moe_config, pretrained=checkpoint)
    assert inference_model(model, image)['pred_label'] == result[
        'pred_label']

    # Weights without class names: labels, no pred_class, no error.
    bare = tmp_path / 'bare.pth'
    torch.save({'state_dict': plain['state_dict']}, bare)
    result = ImageClassificationInferencer(
        tiny_moe_config, pretrained=str(bare))(image)[0]
    assert 'pred_class' not in result and result['pred_label'] in (0, 1)


# -- class names in recycled weights, the weight tool's checks ---------------
def tiny_timm_vit(path, num_classes=2):
    """A timm ViT shaped like the tiny config's model (32 wide, 2 blocks,
    16 px, patch 4)."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2,
                            num_heads=2, mlp_ratio=2, num_classes=num_classes)
    torch.save(vit.state_dict(), path)
    return str(path)


GEN = osp.join(REPO_ROOT, 'tools', 'gen_weight', 'gen_vit_moe_weight.py')


def test_weight_tool_writes_class_names_and_what_it_used(
        tiny_moe_config, tiny_image_folder, tmp_path):
    dense = tiny_timm_vit(tmp_path / 'vit.pth')
    out = tmp_path / 'moe.pth'
    mask = os.umask(0o022)
    try:
        proc = run([
            sys.executable, GEN, tiny_moe_config, '--dense', dense,
            '--method', 'importance', '--calib-data',
            osp.join(tiny_image_folder, 'train'), '--num-calib-images', '100',
            '--out',
            str(out), '--cfg-options', 'model.backbone.moe_layers=[1]'
        ])
    finally:
        os.umask(mask)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The summary only: no MMEngine initialisation log, no mmcv warning.
    assert len(proc.stdout.strip().splitlines()) <= 8, proc.stdout
    assert 'mmcv' not in proc.stderr
    assert 'asked, ' in proc.stderr and 'calibrating on 16' in proc.stderr
    report = json.loads((tmp_path / 'moe.json').read_text())
    assert report['num_calib_images'] == 16  # 8 per class in the folder
    assert report['num_calib_images_asked'] == 100
    assert report['cfg_options'] == {'model.backbone.moe_layers': [1]}
    assert '--num-calib-images 100' in report['command']
    for path in (out, tmp_path / 'moe.json'):
        assert os.stat(path).st_mode & 0o777 == 0o644
    weights = torch.load(out, weights_only=True)
    assert weights['meta']['dataset_meta']['classes'] == ('a', 'b')

    from mmpretrain.apis import ImageClassificationInferencer
    image = osp.join(tiny_image_folder, 'val', 'a', '0.png')
    inferencer = ImageClassificationInferencer(
        tiny_moe_config, pretrained=str(out))
    assert inferencer(image)[0]['pred_class'] in ('a', 'b')


@pytest.mark.parametrize('extra, message', [
    (['--dense', 'missing.pth'], 'error: --dense missing.pth does not exist'),
    (['--dense', '{text}', '--method', 'graph'],
     'error: --method graph needs --calib-data'),
    (['--dense', '{text}'], 'error: checkpoint {text} is not a PyTorch '
     'checkpoint'),
    (['--dense', '{random}'], 'error: checkpoint {random} is not a PyTorch '
     'checkpoint'),
])
def test_weight_tool_expected_errors_are_one_line(tiny_moe_config, tmp_path,
                                                  extra, message):
    text, random = tmp_path / 'notes.pth', tmp_path / 'random.pth'
    text.write_text('these are my notes, not weights\n')
    random.write_bytes(np.random.RandomState(0).bytes(4096))
    fill = dict(text=str(text), random=str(random))
    args = [a.format(**fill) for a in extra]
    start = time.perf_counter()
    proc = run([
        sys.executable, GEN, tiny_moe_config, *args, '--out',
        str(tmp_path / 'o.pth')
    ])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(**fill))
    assert 'weights_only' not in proc.stderr
    if 'missing' in message or 'calib' in message:
        # Checked before the model is built.
        assert time.perf_counter() - start < 60
    debug = run([
        sys.executable, GEN, tiny_moe_config, *args, '--out',
        str(tmp_path / 'o.pth'), '--debug'
    ])
    assert debug.returncode == 1 and 'Traceback' in debug.stderr


def test_moejet_converter_refuses_a_dense_vit(tmp_path):
    dense = tiny_timm_vit(tmp_path / 'vit.pth')
    proc = run([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'model_converters',
                 'moejet_to_mmpretrain.py'), dense,
        str(tmp_path / 'o.pth')
    ])
    assert proc.returncode == 2
    assert 'it is a dense ViT' in proc.stderr
    assert 'gen_vit_moe_weight.py' in proc.stderr
    assert not osp.exists(tmp_path / 'o.pth')


def test_recycle_dense_init_logs_and_rejects_unknown_keys(tmp_path):
    from mmengine.logging import MMLogger
    from mmpretrain.registry import MODELS
    dense = tiny_timm_vit(tmp_path / 'vit.pth')
    backbone = dict(
        type='VisionMoE',
        arch=dict(embed_dims=32, num_layers=2, num_heads=2,
                  feedforward_channels=64),
        img_size=16, patch_size=4, moe_layers=[1],
        moe_cfg=dict(type='SparseMoE', num_experts=2, top_k=1))
    with pytest.raises(ValueError, match=r"unknown keys \['methd'\]"):
        MODELS.build(dict(backbone, init_cfg=dict(
            type='RecycleDenseInit', checkpoint=dense,
            methd='random'))).init_weights()
    logger = MMLogger.get_instance('recycle-init-test')
    lines = []
    handler = type('Keep', (__import__('logging').Handler, ), {
        'emit': lambda self, record: lines.append(record.getMessage())
    })()
    logger.addHandler(handler)
    try:
        model = MODELS.build(dict(backbone, init_cfg=dict(
            type='RecycleDenseInit', checkpoint=dense, method='uniform')))
        model.init_weights()
    finally:
        logger.removeHandler(handler)
    assert any(f'initialised from {dense} (timm, 2 blocks, width 32) by '
               "'uniform'" in line for line in lines), lines


# -- runner set-up -----------------------------------------------------------
def test_runner_setup_amp_fallback_and_workers():
    from mmengine.config import Config

    from moe_plugin.engine.runner_setup import (ensure_portable_checkpoints,
                                                fall_back_from_amp,
                                                fix_persistent_workers)
    cfg = Config(
        dict(
            optim_wrapper=dict(
                type='AmpOptimWrapper', loss_scale='dynamic',
                dtype='bfloat16', optimizer=dict(type='AdamW', lr=1e-3),
                clip_grad=dict(max_norm=1.0)),
            train_dataloader=dict(num_workers=0, persistent_workers=True),
            val_dataloader=dict(num_workers=2, persistent_workers=True),
            default_hooks=dict(checkpoint=dict(type='CheckpointHook'))))
    assert not fall_back_from_amp(cfg, cuda=True)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert fall_back_from_amp(cfg, cuda=False)
    assert cfg.optim_wrapper.to_dict() == dict(
        type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3),
        clip_grad=dict(max_norm=1.0))
    fix_persistent_workers(cfg)
    assert cfg.train_dataloader.persistent_workers is False
    assert cfg.val_dataloader.persistent_workers is True
    assert ensure_portable_checkpoints(cfg)
    assert not ensure_portable_checkpoints(cfg)
    assert [h['type'] for h in cfg.custom_hooks] == ['PortableCheckpointHook']


def test_every_config_without_workers_turns_persistent_workers_off():
    from mmengine.config import Config
    configs = [
        osp.join(root, name)
        for root, _, names in os.walk(osp.join(REPO_ROOT, 'configs'))
        for name in names if name.endswith('.py') and '_base_' not in root
    ]
    checked = 0
    for path in configs:
        cfg = Config.fromfile(path)
        for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            loader = cfg.get(key)
            if loader and not loader.get('num_workers', 0):
                assert loader.get('persistent_workers') is False, (path, key)
                checked += 1
    assert checked > 0


# -- arguments, help, errors, signals ----------------------------------------
def test_group_size_and_capacity_types_agree():
    import argparse

    from moe_plugin.cli import PER_IMAGE, capacity_factor_arg, group_size_arg
    assert group_size_arg('8') == group_size_arg('08') == 8
    assert group_size_arg('image') == PER_IMAGE
    for bad in ('0', '-1', '8.0', '+8', ' 8', 'x', '٣'):
        with pytest.raises(argparse.ArgumentTypeError, match='whole number'):
            group_size_arg(bad)
    assert capacity_factor_arg('0.5') == 0.5
    for bad in ('0', '-1', 'inf', 'nan', 'x'):
        with pytest.raises(argparse.ArgumentTypeError, match='> 0'):
            capacity_factor_arg(bad)


TOOLS = [
    'tools/train.py', 'tools/test.py', 'tools/prepare_digits.py',
    'tools/gen_weight/gen_vit_moe_weight.py',
    'tools/model_converters/vmoe_to_mmpretrain.py',
    'tools/model_converters/moejet_to_mmpretrain.py',
    'tools/analysis/capacity_sweep.py', 'tools/analysis/routing_heatmap.py',
    'tools/analysis/routing_overlay.py', 'tools/analysis/get_flops.py',
    'tools/analysis/ep_scaling.py', 'tools/demo/recycling_demo.py'
]


def test_every_tool_help_shows_defaults():
    # One process for all: each tool's parser, as `--help` prints it.
    script = ('import runpy, sys, io, contextlib\n'
              'for tool in sys.argv[1:]:\n'
              '    sys.argv = [tool, "--help"]\n'
              '    out = io.StringIO()\n'
              '    with contextlib.redirect_stdout(out):\n'
              '        try:\n'
              '            runpy.run_path(tool, run_name="__main__")\n'
              '        except SystemExit:\n'
              '            pass\n'
              '    print("=====", tool)\n'
              '    print(out.getvalue())\n')
    proc = run([sys.executable, '-c', script, *TOOLS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    helps = dict(
        (part.split('\n', 1)[0].strip(), part)
        for part in proc.stdout.split('===== ')[1:])
    assert sorted(helps) == sorted(TOOLS)
    expected = {
        'tools/train.py': '(default: none)',
        'tools/test.py': '(default: 2)',
        'tools/gen_weight/gen_vit_moe_weight.py': '(default: 256)',
        'tools/model_converters/vmoe_to_mmpretrain.py': '(default: 1.05)',
        'tools/analysis/capacity_sweep.py': '(default: val)',
        'tools/analysis/ep_scaling.py': '(default: 32)',
    }
    for tool, text in helps.items():
        assert '--debug' in text, tool
    for tool, default in expected.items():
        assert default in ' '.join(helps[tool].split()), (tool, helps[tool])


def test_sigterm_removes_partial_outputs_like_ctrl_c(tmp_path):
    script = f"""
import sys, time
sys.path.insert(0, {REPO_ROOT!r})
from moe_plugin.cli import run_main
from moe_plugin.fileio import atomic_outputs

def main(argv=None):
    with atomic_outputs([{str(tmp_path / 'w.pth')!r}]) as (tmp, ):
        open(tmp, 'w').write('half')
        print('writing', flush=True)
        time.sleep(60)

run_main(main)
"""
    proc = subprocess.Popen([sys.executable, '-c', script],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == 'writing'
    assert [f for f in os.listdir(tmp_path) if '.part' in f]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and 'interrupted' in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('config, timm_name', [
    ('configs/vmoe/vmoe-timm-s16-every2_8xb128_in1k-upcycled.py',
     'vit_small_patch16_224'),
    ('configs/vmoe/vmoe-timm-b16-every2_8xb128_in1k-upcycled.py',
     'vit_base_patch16_224'),
])
def test_timm_trunk_configs_take_timm_checkpoints(tmp_path, config,
                                                  timm_name):
    """timm's own architecture (2 of its 12 blocks, for speed) upcycles
    into the config's model with every tensor but the routers copied."""
    import timm
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    from moe_plugin import recycling
    vit = timm.create_model(timm_name, pretrained=False, depth=2)
    path = tmp_path / f'{timm_name}.pth'
    torch.save(vit.state_dict(), path)
    cfg = Config.fromfile(osp.join(REPO_ROOT, config))
    cfg.model.backbone.arch.num_layers = 2
    model = MODELS.build(cfg.model)
    state, report = recycling.recycle(
        recycling.load_dense_vit(str(path)), model, method='upcycle')
    model.load_state_dict(state, strict=True)
    assert report['fresh'] == ['backbone.layers.1.ffn.router.weight']
    # The dense block 0 computes what timm's block 0 does.
    x = torch.randn(2, 197, vit.embed_dim)
    torch.testing.assert_close(
        model.backbone.layers[0](x), vit.blocks[0](x), rtol=1e-4, atol=1e-5)
