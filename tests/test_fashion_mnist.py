"""moe_plugin.datasets.fashion_mnist on tiny IDX files the tests write."""
import gzip
import os
import os.path as osp

import numpy as np
import pytest

from moe_plugin.datasets import (FashionMNISTSubset, check_class_split,
                                 prepare_fashion_mnist, read_idx)
from moe_plugin.datasets.fashion_mnist import FILES, subset_indices


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array, written by hand: 0x0000, type
    0x08, the number of dims, then each dim as a big-endian int32."""
    header = bytes([0, 0, 0x08, array.ndim])
    for n in array.shape:
        header += int(n).to_bytes(4, 'big')
    return header + array.astype(np.uint8).tobytes()


def tiny_source(folder, train_per_class=6, test_per_class=3, gz=True):
    """Four Fashion-MNIST-named files: 10 classes, each image filled with
    its own index (mod 256) so that a sample can be traced; labels cycle
    0..9. Returns ``{name: array}``."""
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for prefix, per_class in (('train', train_per_class),
                              ('t10k', test_per_class)):
        n = 10 * per_class
        labels = np.arange(n) % 10
        images = np.broadcast_to(
            (np.arange(n) % 256)[:, None, None], (n, 28, 28)).copy()
        arrays[f'{prefix}-images-idx3-ubyte'] = images
        arrays[f'{prefix}-labels-idx1-ubyte'] = labels
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            with gzip.open(osp.join(folder, name + '.gz'), 'wb') as f:
                f.write(data)
        else:
            with open(osp.join(folder, name), 'wb') as f:
                f.write(data)
    return arrays


def test_read_idx_plain_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / 'a').write_bytes(idx_bytes(images))
    with gzip.open(tmp_path / 'a.gz', 'wb') as f:
        f.write(idx_bytes(images))
    for name in ('a', 'a.gz'):
        out = read_idx(str(tmp_path / name), 'images')
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, images)
    labels = np.array([3, 1, 4], np.uint8)
    (tmp_path / 'l').write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(read_idx(str(tmp_path / 'l'), 'labels'),
                                  labels)


def test_read_idx_bad_magic_and_truncated(tmp_path):
    labels = np.array([3, 1, 4], np.uint8)
    path = tmp_path / 'labels'
    path.write_bytes(idx_bytes(labels))
    # A label file where images are expected: the magic number says so.
    with pytest.raises(ValueError, match=f'{path}.*magic number 0x00000801'):
        read_idx(str(path), 'images')
    bad = tmp_path / 'bad'
    bad.write_bytes(b'\x00\x00\x0d\x01' + idx_bytes(labels)[4:])  # floats
    with pytest.raises(ValueError, match=f'{bad}.*magic'):
        read_idx(str(bad))
    short = tmp_path / 'short'
    short.write_bytes(idx_bytes(labels)[:-1])
    with pytest.raises(ValueError, match=f'{short} is truncated'):
        read_idx(str(short), 'labels')
    header_only = tmp_path / 'header'
    header_only.write_bytes(idx_bytes(np.zeros((2, 28, 28)))[:9])
    with pytest.raises(ValueError, match=f'{header_only} is truncated'):
        read_idx(str(header_only), 'images')


def test_prepare_gunzips_checks_and_is_idempotent(tmp_path):
    arrays = tiny_source(str(tmp_path / 'src'))
    root = str(tmp_path / 'data')
    assert prepare_fashion_mnist(root, str(tmp_path / 'src'),
                                 check_sizes=False) == root
    assert sorted(os.listdir(root)) == sorted(FILES)
    for name, array in arrays.items():
        np.testing.assert_array_equal(read_idx(osp.join(root, name)), array)
    mtime = os.stat(osp.join(root, 'train-images-idx3-ubyte')).st_mtime_ns
    prepare_fashion_mnist(root, str(tmp_path / 'nowhere'), check_sizes=False)
    assert os.stat(osp.join(
        root, 'train-images-idx3-ubyte')).st_mtime_ns == mtime
    # The real data set's sizes are checked by default.
    with pytest.raises(ValueError, match='60000'):
        prepare_fashion_mnist(root, str(tmp_path / 'src'))


def test_prepare_errors(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match='apt-get install dataset-fashion-mnist'):
        prepare_fashion_mnist(str(tmp_path / 'data'), str(tmp_path / 'no'))
    tiny_source(str(tmp_path / 'src'))
    name = 't10k-labels-idx1-ubyte'
    with gzip.open(tmp_path / 'src' / (name + '.gz'), 'wb') as f:
        f.write(idx_bytes(np.zeros(30, np.uint8))[:-2])
    with pytest.raises(ValueError, match=f'{name}.gz.*truncated'):
        prepare_fashion_mnist(str(tmp_path / 'data'), str(tmp_path / 'src'),
                              check_sizes=False)
    # No partial file is left where the damaged one would have gone.
    assert not any(n.startswith(name) for n in os.listdir(tmp_path / 'data'))


def test_check_class_split():
    check_class_split([0, 1, 2], [3, 9])
    with pytest.raises(ValueError, match=r'classes \[2\] are both'):
        check_class_split([0, 1, 2], [2, 3])
    with pytest.raises(ValueError, match=r'downstream classes \[10\]'):
        check_class_split([0], [10])
    with pytest.raises(ValueError, match='upstream classes are empty'):
        check_class_split([], [1])
    with pytest.raises(ValueError, match='repeat'):
        check_class_split([1, 1], [2])


def test_subset_indices_seeded_per_class():
    labels = np.arange(100) % 10
    a = subset_indices(labels, [3, 7], per_class=4, seed=1)
    assert len(a) == 8 and sorted(a) == a
    assert sorted(np.bincount(labels[a], minlength=10)[[3, 7]]) == [4, 4]
    assert a == subset_indices(labels, [3, 7], per_class=4, seed=1)
    assert a != subset_indices(labels, [3, 7], per_class=4, seed=2)
    assert subset_indices(labels, [3]) == list(range(3, 100, 10))
    with pytest.raises(ValueError, match='fewer than per_class=11'):
        subset_indices(labels, [3], per_class=11)


@pytest.fixture
def tiny_root(tmp_path):
    tiny_source(str(tmp_path / 'src'))
    return prepare_fashion_mnist(
        str(tmp_path / 'data'), str(tmp_path / 'src'), check_sizes=False)


def test_subset_remaps_labels_and_never_leaks(tiny_root):
    up = FashionMNISTSubset(
        classes=[0, 1, 2, 3, 4], data_root=tiny_root, split='train')
    down = FashionMNISTSubset(
        classes=[9, 5, 6], data_root=tiny_root, split='train', per_class=2,
        seed=3, pipeline=[dict(type='PackInputs')])
    test = FashionMNISTSubset(
        classes=[9, 5, 6], data_root=tiny_root, split='test')
    assert len(up) == 30 and len(down) == 6 and len(test) == 9
    assert list(down.metainfo['classes']) == ['Ankle boot', 'Sandal', 'Shirt']

    def originals(dataset):
        # Every image is filled with its sample index; labels cycle 0..9.
        return [int(info['img'][0, 0]) for info in
                (dataset.get_data_info(i) for i in range(len(dataset)))]

    for dataset, classes in ((up, [0, 1, 2, 3, 4]), (down, [9, 5, 6]),
                             (test, [9, 5, 6])):
        labels = dataset.get_gt_labels()
        for index, label in zip(originals(dataset), labels):
            assert classes[label] == index % 10
    assert set(o % 10 for o in originals(up)).isdisjoint(
        o % 10 for o in originals(down))
    # split='test' reads the test file (MMPretrain's MNIST alone would read
    # the training file for it).
    assert max(originals(test)) < 30
    sample = down[0]
    assert tuple(sample['inputs'].shape) == (1, 28, 28)
    assert int(sample['data_samples'].gt_label) == down.get_gt_labels()[0]


def test_subset_missing_files_says_how(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get install'):
        FashionMNISTSubset(classes=[0], data_root=str(tmp_path),
                           split='train')


def test_calibration_model_keeps_grey_images():
    """A 1-channel dense ViT (Fashion-MNIST's) is rebuilt for calibration
    with its own image channels, and gives the dense model's features."""
    import torch
    from mmpretrain.models import VisionTransformer

    from moe_plugin.recycling import build_dense_vit
    from moe_plugin.recycling.formats import mmpretrain_to_canonical
    torch.manual_seed(0)
    arch = dict(embed_dims=32, num_layers=2, num_heads=2,
                feedforward_channels=64)
    grey = VisionTransformer(arch=arch, img_size=28, patch_size=4,
                             in_channels=1, out_type='cls_token',
                             norm_cfg=dict(type='LN', eps=1e-6))
    grey.init_weights()
    grey.eval()
    state = {f'backbone.{k}': v for k, v in grey.state_dict().items()}
    dense = mmpretrain_to_canonical(state)
    assert dense.in_channels == 1
    rebuilt = build_dense_vit(dense, grey)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), grey(x))


SHORT_RUN = """
_base_ = [{config!r}]
train_dataloader = dict(dataset=dict(data_root={root!r}, per_class=4))
val_dataloader = dict(dataset=dict(data_root={root!r}, per_class=2))
test_dataloader = val_dataloader
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=3,
                 val_interval=3)
train_dataloader.update(batch_size=8)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=3))
custom_hooks = []
"""


def test_benchmark_config_trains_a_few_iterations(tiny_root, tmp_path):
    """The benchmark's V-MoE config on tiny IDX files: 3 iterations and a
    validation through tools/train.py (grey 28x28 images, classes 5-9
    remapped)."""
    import glob
    import json
    import sys

    from .test_tools import REPO_ROOT, run_tool
    config = tmp_path / 'short.py'
    config.write_text(SHORT_RUN.format(
        config=osp.join(REPO_ROOT, 'configs', 'benchmark', 'recycling',
                        'vmoe_2xb64_fmnist-down.py'), root=tiny_root))
    run_tool([sys.executable, osp.join(REPO_ROOT, 'tools', 'train.py'),
              str(config), '--work-dir', str(tmp_path / 'work')])
    (scalars, ) = glob.glob(str(tmp_path / 'work' / '*' / 'vis_data' /
                                'scalars.json'))
    rows = [json.loads(line) for line in open(scalars) if line.strip()]
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert [r for r in rows if 'accuracy/top1' in r]
