"""Fashion-MNIST for the recycling benchmark: files, checks, class splits.

Fashion-MNIST (Xiao et al., 2017, MIT licence): 70,000 grey 28x28
photographs of clothing in 10 classes, 60,000 train / 10,000 test, shipped
as four gzipped IDX files. Nothing here downloads:
:func:`prepare_fashion_mnist` gunzips the four files from a source folder
(by default where Debian's ``dataset-fashion-mnist`` package installs them)
into a data folder, where MMPretrain's own ``FashionMNIST`` dataset reads
them with ``download=False``.
:class:`FashionMNISTSubset` keeps some classes of it, remaps their labels to
``0..k-1`` and can keep a seeded number of images per class: the upstream
and downstream tasks of ``tools/demo/recycling_demo.py``.
"""
import gzip
import os
import os.path as osp
import shutil
from typing import List, Optional, Sequence

import numpy as np

DEFAULT_SOURCE = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress',
                         'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
# name -> (images or labels, number of samples)
FILES = {
    'train-images-idx3-ubyte': ('images', 60000),
    'train-labels-idx1-ubyte': ('labels', 60000),
    't10k-images-idx3-ubyte': ('images', 10000),
    't10k-labels-idx1-ubyte': ('labels', 10000),
}
# IDX magic numbers: 0x0000 0x08 (unsigned byte) then the number of dims.
MAGIC = {'images': 0x00000803, 'labels': 0x00000801}
HOW_TO_GET = (
    'install them with `sudo apt-get install dataset-fashion-mnist` '
    f'(Debian/Ubuntu; they go to {DEFAULT_SOURCE}) or download the four '
    'files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, '
    't10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from '
    'https://github.com/zalandoresearch/fashion-mnist into one folder and '
    'pass it as --data-src')


def read_idx(path: str, kind: Optional[str] = None) -> np.ndarray:
    """Read an (optionally gzipped) IDX file of unsigned bytes.

    Args:
        path (str): the file.
        kind (str, optional): ``'images'`` (3 dims) or ``'labels'``
            (1 dim) to check the magic number against. Defaults to None
            (any unsigned-byte IDX file).

    Returns:
        np.ndarray: ``uint8`` of the shape the header gives (``[N, 28, 28]``
        images, ``[N]`` labels).
    """
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f'{path} is truncated: {len(data)} bytes, no IDX '
                         'header')
    magic = int.from_bytes(data[:4], 'big')
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or not 1 <= ndim <= 4 or (
            kind is not None and magic != MAGIC[kind]):
        want = f'{MAGIC[kind]:#010x}' if kind else '0x000008NN'
        raise ValueError(f'{path} is not an IDX file of unsigned bytes'
                         f'{" " + kind if kind else ""}: magic number '
                         f'{magic:#010x}, expected {want}')
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f'{path} is truncated: {len(data)} bytes, the '
                         f'header alone takes {header}')
    shape = tuple(
        int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise ValueError(f'{path} is truncated or damaged: the header says '
                         f'{shape} ({size} bytes of data), the file holds '
                         f'{len(data) - header}')
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def is_prepared(root: str) -> bool:
    """Whether ``root`` holds the four uncompressed files."""
    return all(osp.isfile(osp.join(root, name)) for name in FILES)


def prepare_fashion_mnist(root: str = 'data/fashion_mnist',
                          source: str = DEFAULT_SOURCE,
                          check_sizes: bool = True) -> str:
    """Gunzip the four Fashion-MNIST files from ``source`` into ``root``.

    Idempotent (files already in ``root`` are left alone) and atomic per
    file (each is written to a temporary name, checked, then renamed).
    Every file is read back and checked: its magic number, that its data
    is as long as its header says and, with ``check_sizes``, the 60,000 /
    10,000 samples of the real data set.

    Args:
        root (str): the data folder (MMPretrain's ``data_root``).
            Defaults to ``'data/fashion_mnist'``.
        source (str): the folder holding the ``*.gz`` files (or already
            uncompressed ones). Defaults to Debian's
            ``/usr/share/datasets/fashion-mnist``.
        check_sizes (bool): check the real data set's sample counts.
            Defaults to True.

    Returns:
        str: ``root``.
    """
    os.makedirs(root, exist_ok=True)
    for name, (kind, count) in FILES.items():
        target = osp.join(root, name)
        if not osp.isfile(target):
            candidates = [osp.join(source, name + '.gz'),
                          osp.join(source, name)]
            found = [p for p in candidates if osp.isfile(p)]
            if not found:
                raise FileNotFoundError(
                    f'Fashion-MNIST: {candidates[0]} not found (nor '
                    f'{root}/{name}); {HOW_TO_GET}')
            tmp = target + '.part'
            opener = gzip.open if found[0].endswith('.gz') else open
            with opener(found[0], 'rb') as src, open(tmp, 'wb') as dst:
                shutil.copyfileobj(src, dst)
            try:
                array = read_idx(tmp, kind)
            except ValueError as error:
                os.remove(tmp)
                raise ValueError(f'{found[0]}: {error}') from None
            os.replace(tmp, target)
        else:
            array = read_idx(target, kind)
        if check_sizes and len(array) != count:
            raise ValueError(f'{target} holds {len(array)} samples, '
                             f'Fashion-MNIST has {count}')
    return root


def check_classes(name: str, classes: Sequence[int],
                  num_classes: int = 10) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``classes`` is non-empty,
    without repeats and within ``0..num_classes-1``."""
    if not len(classes):
        raise ValueError(f'{name} classes are empty')
    bad = [c for c in classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f'{name} classes {bad} are not in '
                         f'0..{num_classes - 1}')
    if len(set(classes)) != len(classes):
        raise ValueError(f'{name} classes {list(classes)} repeat one')


def check_class_split(upstream: Sequence[int], downstream: Sequence[int],
                      num_classes: int = 10) -> None:
    """Raise ``ValueError`` unless the two class lists are non-empty,
    without repeats, within ``0..num_classes-1`` and disjoint."""
    check_classes('upstream', upstream, num_classes)
    check_classes('downstream', downstream, num_classes)
    both = sorted(set(upstream) & set(downstream))
    if both:
        raise ValueError(f'classes {both} are both upstream and downstream: '
                         'the split must be disjoint')


def subset_indices(labels: np.ndarray, classes: Sequence[int],
                   per_class: Optional[int] = None,
                   seed: int = 0) -> List[int]:
    """Indices of the samples of ``classes``, sorted; with ``per_class``, a
    seeded random ``per_class`` of each class.

    Args:
        labels (np.ndarray): ``[N]`` class of every sample.
        classes (Sequence[int]): the classes kept.
        per_class (int, optional): samples kept per class. Defaults to
            None (all).
        seed (int): seed of the draw. Defaults to 0.

    Returns:
        list[int]: indices into ``labels``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in classes:
        members = np.flatnonzero(labels == cls)
        if per_class is not None:
            if per_class < 1:
                raise ValueError(f'per_class must be >= 1, got {per_class}')
            if per_class > len(members):
                raise ValueError(f'class {cls} has {len(members)} samples, '
                                 f'fewer than per_class={per_class}')
            members = rng.choice(members, per_class, replace=False)
        chosen.extend(members.tolist())
    return sorted(chosen)


def _register():
    from mmpretrain.datasets import FashionMNIST
    from mmpretrain.registry import DATASETS

    @DATASETS.register_module(force=True)
    class FashionMNISTSubset(FashionMNIST):
        """MMPretrain's ``FashionMNIST`` restricted to some classes, their
        labels remapped to ``0..k-1`` in the order given.

        Args:
            classes (Sequence[int]): the original class indices kept.
            per_class (int, optional): keep a seeded random ``per_class``
                images of each class. Defaults to None (all).
            seed (int): seed of that draw. Defaults to 0.
            **kwargs: ``FashionMNIST``'s (``data_root``, ``split``,
                ``pipeline``, ...); ``download`` defaults to False.
        """

        def __init__(self,
                     classes: Sequence[int],
                     per_class: Optional[int] = None,
                     seed: int = 0,
                     download: bool = False,
                     **kwargs):
            classes = [int(c) for c in classes]
            check_classes('kept', classes)
            self.kept_classes = classes
            self.per_class = per_class
            self.subset_seed = seed
            data_root = kwargs.get('data_root', '')
            if data_root and not download and not is_prepared(data_root):
                raise FileNotFoundError(
                    f'Fashion-MNIST files are missing in {data_root}: run '
                    'tools/demo/recycling_demo.py --dataset fashion_mnist '
                    '(or make fashion-mnist-data), which gunzips them from '
                    f'--data-src; to get the files, {HOW_TO_GET}')
            metainfo = dict(
                classes=[FASHION_MNIST_CLASSES[c] for c in classes])
            # MMPretrain 1.2.0's MNIST picks the files by ``test_mode``,
            # not by ``split``: without this, split='test' reads the
            # training images.
            kwargs['test_mode'] = kwargs.get('split', 'train') == 'test'
            super().__init__(download=download, metainfo=metainfo, **kwargs)

        def load_data_list(self):
            infos = super().load_data_list()
            labels = np.array([int(info['gt_label']) for info in infos])
            remap = {c: i for i, c in enumerate(self.kept_classes)}
            keep = subset_indices(labels, self.kept_classes, self.per_class,
                                  self.subset_seed)
            out = []
            for i in keep:
                info = dict(infos[i])
                info['gt_label'] = np.array(remap[int(labels[i])], np.int64)
                out.append(info)
            return out

    return FashionMNISTSubset


FashionMNISTSubset = _register()
