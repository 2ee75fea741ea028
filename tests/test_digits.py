"""moe_plugin.datasets.digits: the demo's image folder."""
import os
import os.path as osp

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from moe_plugin.datasets import DIGITS_CLASSES, prepare_digits
from moe_plugin.datasets.digits import NUM_IMAGES, is_complete


def list_split(root, split):
    """{image id: class} of one split."""
    found = {}
    for cls in os.listdir(osp.join(root, split)):
        for name in os.listdir(osp.join(root, split, cls)):
            found[int(name[:-4])] = int(cls)
    return found


@pytest.fixture(scope='module')
def nearest_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('digits') / 'digits')
    assert prepare_digits(root, interpolation='nearest') == root
    return root


def test_layout_split_and_labels(nearest_root):
    digits = load_digits()
    train = list_split(nearest_root, 'train')
    val = list_split(nearest_root, 'val')
    assert sorted(os.listdir(osp.join(nearest_root, 'train'))) == list(
        DIGITS_CLASSES)
    assert set(train).isdisjoint(val)
    assert set(train) | set(val) == set(range(NUM_IMAGES))
    for index, cls in {**train, **val}.items():
        assert digits.target[index] == cls
    # Stratified 80/20: each class holds round(20 %) of its images in val.
    for cls in range(10):
        total = int((digits.target == cls).sum())
        in_val = sum(1 for c in val.values() if c == cls)
        assert in_val == round(total * 0.2)
    assert len(val) == 359


def test_pixels_are_the_upsampled_digit(nearest_root):
    digits = load_digits()
    for index in (0, 1, 500, 1796):
        split = 'val' if index in list_split(nearest_root, 'val') else 'train'
        path = osp.join(nearest_root, split, str(digits.target[index]),
                        f'{index:04d}.png')
        img = np.asarray(Image.open(path))
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        expected = np.kron(
            np.clip(digits.images[index] * 255.0 / 16.0, 0, 255).astype(
                np.uint8), np.ones((4, 4), np.uint8))
        for channel in range(3):
            np.testing.assert_array_equal(img[..., channel], expected)


def test_idempotent_and_seeded(nearest_root, tmp_path):
    before = {
        p: os.stat(osp.join(nearest_root, 'val', '0', p)).st_mtime_ns
        for p in os.listdir(osp.join(nearest_root, 'val', '0'))
    }
    prepare_digits(nearest_root, interpolation='nearest')
    after = {
        p: os.stat(osp.join(nearest_root, 'val', '0', p)).st_mtime_ns
        for p in os.listdir(osp.join(nearest_root, 'val', '0'))
    }
    assert before == after
    other = str(tmp_path / 'bicubic')
    prepare_digits(other)
    assert is_complete(other)
    # Same seed, same split, whatever the interpolation.
    assert list_split(other, 'val') == list_split(nearest_root, 'val')


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 50:
            raise KeyboardInterrupt
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, 'save', failing_save)
    with pytest.raises(KeyboardInterrupt):
        prepare_digits(str(tmp_path / 'digits'))
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='interpolation'):
        prepare_digits(str(tmp_path / 'a'), interpolation='lanczos')
    with pytest.raises(ValueError, match='val_ratio'):
        prepare_digits(str(tmp_path / 'a'), val_ratio=1.0)
    os.makedirs(tmp_path / 'partial' / 'train')
    with pytest.raises(FileExistsError, match='partial'):
        prepare_digits(str(tmp_path / 'partial'))
