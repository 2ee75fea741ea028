"""Models and labelled batches from a config, for the analysis tools.

MMPretrain's own loaders do the work: :func:`mmpretrain.apis.get_model`
builds the model and loads the checkpoint, ``Runner.build_dataloader``
builds a split's data loader and the model's data preprocessor prepares the
batches. Run checkpoints of ``tools/train.py`` load with plain
``torch.load(weights_only=True)`` (``PortableCheckpointHook``); one written
before that holds MMEngine's message hub and is loaded inside
:func:`moe_plugin.compat.run_checkpoint_scope` (the scoped allow-list of
``tools/test.py``).
"""
import copy
from typing import Iterator, Optional, Tuple

import torch
from mmengine.config import Config
from torch import Tensor, nn

from moe_plugin.compat import run_checkpoint_scope

#: Splits a config names as ``<split>_dataloader``.
SPLITS = ('train', 'val', 'test')


def load_config(config, cfg_options: Optional[dict] = None) -> Config:
    """A config from a path (or a Config), with ``cfg_options`` merged."""
    import moe_plugin  # noqa: F401  (registers the models)
    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    cfg = copy.deepcopy(cfg)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def load_model(cfg: Config,
               checkpoint: Optional[str] = None,
               device: str = 'cpu') -> nn.Module:
    """Build the model of ``cfg``, load ``checkpoint``, evaluation mode.

    Args:
        cfg (Config): the config.
        checkpoint (str, optional): a checkpoint of this model (a run's
            checkpoint or a plain state dict). Defaults to None (fresh
            initialisation).
        device (str): Defaults to 'cpu'.

    Returns:
        nn.Module: the model, with the checkpoint's ``dataset_meta`` in
        ``_dataset_meta`` (as ``get_model`` leaves it).
    """
    from mmpretrain.apis import get_model
    with run_checkpoint_scope():
        model = get_model(
            cfg, pretrained=checkpoint or False, device=device)
    return model


def build_split_loader(cfg: Config, split: str = 'val', batch_size=None):
    """The data loader of a split, with the test pipeline and no shuffling.

    Args:
        cfg (Config): the config.
        split (str): 'train', 'val' or 'test'. Defaults to 'val'.
        batch_size (int, optional): overrides the config's.

    Returns:
        torch.utils.data.DataLoader: single-process, in order.
    """
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    key = f'{split}_dataloader'
    if cfg.get(key) is None:
        raise ValueError(f'the config has no {key}')
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner
    loader_cfg = copy.deepcopy(cfg[key])
    loader_cfg['sampler'] = dict(type='DefaultSampler', shuffle=False)
    loader_cfg.pop('batch_sampler', None)
    loader_cfg['num_workers'] = 0
    loader_cfg.pop('persistent_workers', None)
    if batch_size is not None:
        loader_cfg['batch_size'] = batch_size
    if split == 'train':
        # The test pipeline: no random augmentation in an analysis.
        test_cfg = cfg.get('test_dataloader') or cfg.get('val_dataloader')
        loader_cfg['dataset']['pipeline'] = copy.deepcopy(
            test_cfg['dataset']['pipeline'])
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return Runner.build_dataloader(loader_cfg)


def labelled_batches(model: nn.Module,
                     loader,
                     progress: Optional[str] = None
                     ) -> Iterator[Tuple[Tensor, Tensor]]:
    """``(inputs, labels)`` of every batch, through the data preprocessor.

    Args:
        model (nn.Module): a classifier with a ``data_preprocessor``.
        loader: a data loader of MMPretrain ``PackInputs`` batches.
        progress (str, optional): show MMEngine's progress bar (images)
            on stderr, after this label. Defaults to None (no bar).

    Yields:
        tuple: ``inputs [B, C, H, W]`` and ``labels [B]`` (long).
    """
    bar = None
    if progress is not None:
        import sys

        from mmengine.utils import ProgressBar
        print(progress, file=sys.stderr, flush=True)
        bar = ProgressBar(len(loader.dataset), file=sys.stderr)
    for data in loader:
        data = model.data_preprocessor(data, False)
        labels = torch.cat(
            [sample.gt_label.reshape(-1)[:1] for sample in
             data['data_samples']]).long()
        if bar is not None:
            bar.update(len(labels))
        yield data['inputs'], labels
    if bar is not None:
        print(file=sys.stderr, flush=True)


def class_names(model: nn.Module, num_classes: int):
    """Class names from the checkpoint's ``dataset_meta`` (kept by
    :func:`load_model` as MMPretrain's ``get_model`` does, in
    ``model._dataset_meta``), or ``0 .. C-1``."""
    meta = (getattr(model, '_dataset_meta', None)
            or getattr(model, 'dataset_meta', None) or {})
    classes = meta.get('classes')
    if classes is not None and len(classes) == num_classes:
        return [str(c) for c in classes]
    return [str(i) for i in range(num_classes)]
