"""Write scikit-learn's hand-written digits as an image folder.

The 1,797 grey 8x8 images of ``sklearn.datasets.load_digits`` (shipped inside
scikit-learn, nothing is downloaded) are upsampled to 32x32 RGB PNG files and
split, stratified and seeded, into ``train/<class>/<id>.png`` and
``val/<class>/<id>.png``, the layout MMPretrain's ``CustomDataset`` reads.
The demo config (``configs/demo/``) trains a small V-MoE on it.
"""
import os
import os.path as osp
import shutil
import tempfile
from typing import Dict

import numpy as np

DIGITS_CLASSES = tuple(str(i) for i in range(10))
NUM_IMAGES = 1797


def _split_indices(labels: np.ndarray, val_ratio: float,
                   seed: int) -> Dict[str, np.ndarray]:
    """Stratified, seeded split of sample indices into train and val."""
    rng = np.random.RandomState(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        num_val = int(round(len(idx) * val_ratio))
        val.append(idx[:num_val])
        train.append(idx[num_val:])
    return dict(
        train=np.sort(np.concatenate(train)), val=np.sort(np.concatenate(val)))


def _count_images(root: str) -> int:
    total = 0
    for split in ('train', 'val'):
        for cls in DIGITS_CLASSES:
            folder = osp.join(root, split, cls)
            if osp.isdir(folder):
                total += sum(f.endswith('.png') for f in os.listdir(folder))
    return total


def is_complete(root: str) -> bool:
    """Whether ``root`` already holds all the digits images.

    Args:
        root (str): The folder given to :func:`prepare_digits`.

    Returns:
        bool: True when both splits hold all 1,797 images.
    """
    return _count_images(root) == NUM_IMAGES


def prepare_digits(root: str = 'data/digits',
                   img_size: int = 32,
                   val_ratio: float = 0.2,
                   seed: int = 0,
                   interpolation: str = 'bicubic') -> str:
    """Write the digits image folder once.

    Idempotent (a complete folder is left alone) and atomic: the images are
    written to a temporary folder beside ``root`` that is renamed into place
    only when complete, so an interrupted run never leaves a partial data
    set that looks finished.

    Args:
        root (str): Output folder. Defaults to ``'data/digits'``.
        img_size (int): Side of the written square images in pixels.
            Defaults to 32.
        val_ratio (float): Share of each class put into ``val``.
            Defaults to 0.2.
        seed (int): Seed of the split. Defaults to 0.
        interpolation (str): ``'bicubic'`` or ``'nearest'`` upsampling.
            Defaults to ``'bicubic'``.

    Returns:
        str: ``root``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    if interpolation not in ('bicubic', 'nearest'):
        raise ValueError(f'interpolation must be "bicubic" or "nearest", '
                         f'got {interpolation!r}')
    if not 0 < val_ratio < 1:
        raise ValueError(f'val_ratio must be in (0, 1), got {val_ratio}')
    if is_complete(root):
        return root
    if osp.exists(root):
        raise FileExistsError(
            f'{root} exists but does not hold the {NUM_IMAGES} digits '
            f'images ({_count_images(root)} found); remove it and run again')

    digits = load_digits()
    # Pixel values are 0..16 (ink is high); scale to 0..255.
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = digits.target
    resample = dict(
        bicubic=Image.Resampling.BICUBIC,
        nearest=Image.Resampling.NEAREST)[interpolation]

    parent = osp.dirname(osp.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.digits-', dir=parent)
    try:
        for split, indices in _split_indices(labels, val_ratio, seed).items():
            for cls in DIGITS_CLASSES:
                os.makedirs(osp.join(tmp, split, cls))
            for i in indices:
                img = Image.fromarray(images[i]).resize(
                    (img_size, img_size), resample).convert('RGB')
                img.save(osp.join(tmp, split, str(labels[i]), f'{i:04d}.png'))
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
