"""Shared fixtures: a tiny generated image folder, a tiny V-MoE config and
the ``device`` that the device-independent tests run on (``--device``)."""
import os
import os.path as osp

import numpy as np
import pytest
import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

#: A config for tools/train.py and tools/test.py: a 2-block V-MoE on 16 px
#: images of 2 classes. No random augmentation, dropout or router noise, so
#: that an interrupted and resumed run can be compared with an
#: uninterrupted one. ``{data_root}`` is filled in by the fixture.
TINY_CONFIG = """
_base_ = [{runtime!r}]
model = dict(
    type='MoEImageClassifier',
    backbone=dict(
        type='VisionMoE',
        arch=dict(embed_dims=32, num_layers=2, num_heads=2,
                  feedforward_channels=64),
        img_size=16,
        patch_size=4,
        moe_layers='every-2',
        moe_cfg=dict(type='SparseMoE', num_experts=4, top_k=2,
                     capacity_factor=1.05, noise_std=0.0)),
    neck=None,
    head=dict(type='VisionTransformerClsHead', num_classes=2, in_channels=32,
              loss=dict(type='CrossEntropyLoss')),
    data_preprocessor=dict(num_classes=2, mean=[127.5] * 3,
                           std=[127.5] * 3, to_rgb=True))
pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=4, num_workers=0,
    dataset=dict(type='CustomDataset', data_root={data_root!r},
                 data_prefix='train', pipeline=pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=4, num_workers=0,
    dataset=dict(type='CustomDataset', data_root={data_root!r},
                 data_prefix='val', pipeline=pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-3,
                                    weight_decay=0.05))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False,
                        begin=0, end=6)]
train_cfg = dict(by_epoch=False, max_iters=6, val_interval=100)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2,
                    max_keep_ckpts=5))
randomness = dict(seed=0)
"""


def write_image_folder(root, num_train=8, num_val=4, size=16, seed=0):
    """Write 2 classes of ``size`` px images (dark left / dark right half).

    Returns:
        str: ``root``, holding ``{train,val}/{a,b}/*.png``.
    """
    from PIL import Image
    rng = np.random.RandomState(seed)
    for split, count in (('train', num_train), ('val', num_val)):
        for cls_index, cls in enumerate(('a', 'b')):
            folder = osp.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                img = rng.randint(128, 256, (size, size, 3)).astype(np.uint8)
                half = slice(0, size // 2) if cls_index == 0 else slice(
                    size // 2, size)
                img[:, half] //= 4
                Image.fromarray(img).save(osp.join(folder, f'{i}.png'))
    return root


@pytest.fixture(scope='session')
def tiny_image_folder(tmp_path_factory):
    """A 2-class 16 px image folder with 8 train and 4 val images each."""
    return write_image_folder(str(tmp_path_factory.mktemp('tiny_images')))


@pytest.fixture(scope='session')
def tiny_moe_config(tmp_path_factory, tiny_image_folder):
    """Path of :data:`TINY_CONFIG` written for :func:`tiny_image_folder`."""
    path = tmp_path_factory.mktemp('tiny_config') / 'vmoe-tiny_1xb4_toy.py'
    path.write_text(
        TINY_CONFIG.format(
            runtime=osp.join(REPO_ROOT, 'configs', '_base_',
                             'default_runtime.py'),
            data_root=tiny_image_folder))
    return str(path)


def pytest_addoption(parser):
    parser.addoption(
        '--device', default='cpu',
        help='device of the tests that take the `device` fixture (marked '
        '`device`; run them alone with -m device), e.g. cuda')


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'device: takes the `device` fixture (runs on --device)')
    name = config.getoption('--device')
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise pytest.UsageError(f'--device {name!r}: {error}') from error
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise pytest.UsageError(f'--device {name!r}: CUDA is not available')


def pytest_collection_modifyitems(config, items):
    for item in items:
        if 'device' in getattr(item, 'fixturenames', ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope='session')
def device(request):
    """``torch.device`` of ``--device`` (default cpu; checked at start)."""
    return torch.device(request.config.getoption('--device'))
