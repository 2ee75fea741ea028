"""Digits pasted on a canvas: tiny detection and segmentation sets.

scikit-learn's 8x8 hand-written digits (shipped with it, nothing is
downloaded), upscaled, are pasted at random places of a dark canvas, up to
``max_digits`` per image without overlap. Written once, seeded:

- ``images/{train,val}/<id>.png``: RGB canvases;
- ``annotations/{train,val}.json``: COCO instances (boxes, polygon-free RLE
  masks, categories ``'0'``..``'9'``), for MMDetection's ``CocoDataset``;
- ``seg_maps/{train,val}/<id>.png``: label maps, 0 = background, ``1 + d``
  for the pixels of digit ``d``, for MMSegmentation's ``BaseSegDataset``.
"""
import json
import os
import os.path as osp
import shutil
from typing import Dict, List, Tuple

import numpy as np

#: Classes of the detection set; the segmentation set adds 'background'.
CANVAS_CLASSES = tuple(str(i) for i in range(10))
SEG_CLASSES = ('background', ) + CANVAS_CLASSES


def _rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of a binary mask (column-major runs)."""
    flat = np.asfortranarray(mask).reshape(-1, order='F').astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return dict(size=list(mask.shape), counts=counts)


def _place(rng, canvas: int, size: int, taken: List[Tuple[int, int]],
           tries: int = 50):
    """A top-left corner whose ``size`` square overlaps none taken."""
    for _ in range(tries):
        y, x = rng.randint(0, canvas - size + 1, size=2)
        if all(abs(y - ty) >= size or abs(x - tx) >= size
               for ty, tx in taken):
            return int(y), int(x)
    return None


def _write_split(root: str, split: str, count: int, digits, labels,
                 rng, canvas: int, digit_size: int, max_digits: int,
                 start_id: int) -> None:
    from PIL import Image
    for sub in ('images', 'seg_maps'):
        os.makedirs(osp.join(root, sub, split), exist_ok=True)
    images, annotations = [], []
    ann_id = start_id
    for index in range(count):
        image = rng.randint(0, 40, (canvas, canvas, 3)).astype(np.uint8)
        seg = np.zeros((canvas, canvas), np.uint8)
        taken = []
        for _ in range(rng.randint(1, max_digits + 1)):
            corner = _place(rng, canvas, digit_size, taken)
            if corner is None:
                continue
            taken.append(corner)
            pick = rng.randint(len(digits))
            glyph = np.asarray(
                Image.fromarray((digits[pick] * 255 / 16).astype(
                    np.uint8)).resize((digit_size, digit_size),
                                      Image.BILINEAR))
            mask = glyph > 96
            if not mask.any():
                continue
            y, x = corner
            colour = rng.randint(150, 256, 3)
            region = image[y:y + digit_size, x:x + digit_size]
            region[mask] = colour
            seg[y:y + digit_size, x:x + digit_size][mask] = 1 + labels[pick]
            full = np.zeros((canvas, canvas), np.uint8)
            full[y:y + digit_size, x:x + digit_size] = mask
            ys, xs = np.nonzero(full)
            x0, y0 = int(xs.min()), int(ys.min())
            w, h = int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0
            annotations.append(
                dict(id=ann_id, image_id=start_id + index,
                     category_id=int(labels[pick]), bbox=[x0, y0, w, h],
                     area=int(full.sum()), iscrowd=0,
                     segmentation=_rle(full)))
            ann_id += 1
        name = f'{index:05d}.png'
        Image.fromarray(image).save(osp.join(root, 'images', split, name))
        Image.fromarray(seg).save(osp.join(root, 'seg_maps', split, name))
        images.append(dict(id=start_id + index, file_name=name,
                           height=canvas, width=canvas))
    coco = dict(images=images, annotations=annotations,
                categories=[dict(id=i, name=c)
                            for i, c in enumerate(CANVAS_CLASSES)])
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    with open(osp.join(root, 'annotations', f'{split}.json'), 'w') as f:
        json.dump(coco, f)


def prepare_digit_canvas(root: str = 'data/digit_canvas',
                         num_train: int = 400,
                         num_val: int = 100,
                         canvas: int = 96,
                         digit_size: int = 28,
                         max_digits: int = 3,
                         seed: int = 0) -> Dict[str, str]:
    """Write the canvas sets once (a complete set is kept).

    Args:
        root (str): Output folder. Defaults to 'data/digit_canvas'.
        num_train (int): Training canvases. Defaults to 400.
        num_val (int): Validation canvases. Defaults to 100.
        canvas (int): Canvas side in pixels. Defaults to 96.
        digit_size (int): Side of a pasted digit. Defaults to 28.
        max_digits (int): Digits per canvas, 1 to this. Defaults to 3.
        seed (int): Seed. Defaults to 0.

    Returns:
        dict: ``root`` and the paths of the two annotation files.
    """
    if not 0 < digit_size <= canvas:
        raise ValueError(f'digit_size={digit_size} must be in (0, canvas='
                         f'{canvas}]')
    if num_train < 1 or num_val < 1 or max_digits < 1:
        raise ValueError(f'num_train={num_train}, num_val={num_val} and '
                         f'max_digits={max_digits} must be >= 1')
    stamp = osp.join(root, '.complete')
    if not osp.isfile(stamp):
        from sklearn.datasets import load_digits
        digits = load_digits()
        # Train and val paste disjoint halves of the digits.
        rng = np.random.RandomState(seed)
        order = rng.permutation(len(digits.target))
        half = len(order) * 4 // 5
        tmp = root.rstrip('/') + '.part'
        shutil.rmtree(tmp, ignore_errors=True)
        for split, count, pool, start in (
                ('train', num_train, order[:half], 0),
                ('val', num_val, order[half:], 1_000_000)):
            _write_split(tmp, split, count, digits.images[pool],
                         digits.target[pool], rng, canvas, digit_size,
                         max_digits, start)
        open(osp.join(tmp, '.complete'), 'w').close()
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return dict(root=root,
                train=osp.join(root, 'annotations', 'train.json'),
                val=osp.join(root, 'annotations', 'val.json'))
