"""Class names for the ``meta.dataset_meta`` of written weights.

MMPretrain's ``get_model`` and ``ImageClassificationInferencer`` take the
class names from ``checkpoint['meta']['dataset_meta']['classes']`` and
return ``pred_class`` only when they are there. Run checkpoints carry them
(MMEngine writes the training set's metainfo); recycled and converted
weights get them here, from the config's data set (an explicit
``classes`` / ``metainfo``, the data set type's own ``METAINFO``, or the
sub-folders of a ``CustomDataset``, as it finds them) or from the source
checkpoint's meta, whichever has as many names as the model has classes.
"""
import os.path as osp
from typing import Optional, Sequence, Tuple

#: The dataloaders whose data set names the classes, in order of trust.
_LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def _folder_classes(dataset: dict) -> Optional[Tuple[str, ...]]:
    """A ``CustomDataset``'s classes: the sub-folders of its image folder
    (sorted, as ``mmpretrain.datasets.custom.find_folders`` returns them),
    when the folder exists and has no annotation file."""
    if dataset.get('ann_file'):
        return None
    prefix = dataset.get('data_prefix', '')
    if isinstance(prefix, dict):
        prefix = prefix.get('img_path', '')
    root = osp.join(dataset.get('data_root', '') or '', prefix or '')
    if not root or not osp.isdir(root):
        return None
    from mmpretrain.datasets.custom import find_folders
    folders, _ = find_folders(root)
    return tuple(folders) or None


def dataset_classes(dataset: dict) -> Optional[Tuple[str, ...]]:
    """The class names a data set config names, or None.

    Args:
        dataset (dict): a data set config (``type=...``); wrappers with a
            ``dataset`` key are unwrapped.

    Returns:
        tuple | None: the names, in label order.
    """
    while isinstance(dataset.get('dataset'), dict):
        dataset = dataset['dataset']
    classes = dataset.get('classes') or (dataset.get('metainfo')
                                         or {}).get('classes')
    if isinstance(classes, (list, tuple)):
        return tuple(str(c) for c in classes)
    if isinstance(classes, str) and osp.isfile(classes):
        with open(classes) as f:
            return tuple(line.strip() for line in f if line.strip())
    kind = dataset.get('type')
    if kind in ('CustomDataset', 'mmpretrain.CustomDataset'):
        return _folder_classes(dataset)
    if isinstance(kind, str):
        from mmpretrain.registry import DATASETS
        cls = DATASETS.get(kind.split('.')[-1])
        names = getattr(cls, 'METAINFO', {}).get('classes')
        if names:
            return tuple(str(c) for c in names)
    return None


def config_classes(cfg, num_classes: int) -> Optional[Tuple[str, ...]]:
    """The first dataloader's class names that count ``num_classes``."""
    for key in _LOADERS:
        loader = cfg.get(key, None)
        dataset = (loader or {}).get('dataset')
        if isinstance(dataset, dict):
            classes = dataset_classes(dataset)
            if classes is not None and len(classes) == num_classes:
                return classes
    return None


def checkpoint_classes(path: str) -> Optional[Tuple[str, ...]]:
    """The class names in a ``.pth`` checkpoint's ``meta.dataset_meta``, or
    None (other formats, or none stored). Memory-mapped: the weights are
    not read."""
    if not path.endswith(('.pth', '.pt')):
        return None
    import torch
    try:
        checkpoint = torch.load(
            path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # unreadable here: the readers report it
        return None
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    classes = ((meta or {}).get('dataset_meta') or {}).get('classes')
    if isinstance(classes, (list, tuple)) and classes:
        return tuple(str(c) for c in classes)
    return None


def weights_meta(num_classes: Optional[int],
                 config_names: Optional[Sequence[str]] = None,
                 source_names: Optional[Sequence[str]] = None) -> dict:
    """The ``meta`` to save with weights: ``dataset_meta.classes`` from the
    config (preferred) or the source, the first with ``num_classes`` names;
    empty when neither fits (the inferencer then returns labels only).

    Args:
        num_classes (int, optional): the model's classes (None: unknown).
        config_names (Sequence[str], optional): from the config.
        source_names (Sequence[str], optional): from the source checkpoint
            (only when its head was kept).

    Returns:
        dict: ``{'dataset_meta': {'classes': (...)}}`` or ``{}``.
    """
    for names in (config_names, source_names):
        if names and (num_classes is None or len(names) == num_classes):
            return dict(dataset_meta=dict(classes=tuple(names)))
    return {}


def model_num_classes(model) -> Optional[int]:
    """Classes of an MMPretrain classifier's head, or None."""
    head = getattr(model, 'head', None)
    return getattr(head, 'num_classes', None)
