"""Write a converted checkpoint and its config, checked and atomically.

Shared by ``tools/model_converters/*_to_mmpretrain.py``: the model the
config describes is built with ``MODELS.build`` and loads the state dict
strictly before anything is written; each file goes to a temporary name in
its folder and is renamed; an existing output is an error unless ``force``.
"""
import os.path as osp
import pprint
import tempfile
import textwrap
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..fileio import atomic_outputs, check_outputs  # noqa: F401

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
RUNTIME_BASE = osp.join(REPO_ROOT, 'configs', '_base_', 'default_runtime.py')


def build_checked_model(model_cfg: dict,
                        state: Dict[str, Tensor]) -> nn.Module:
    """Build ``model_cfg`` and load ``state`` into it strictly.

    Returns:
        nn.Module: the model, in evaluation mode.
    """
    from mmengine.config import ConfigDict
    from mmpretrain.registry import MODELS

    import moe_plugin  # noqa: F401  (registers the models)
    model = MODELS.build(ConfigDict(model_cfg))
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_pipeline(img_size: int) -> list:
    """ImageNet evaluation at ``img_size``: at 224 px V-MoE's
    ``resize_small(256)|central_crop(224)``, otherwise the shorter edge
    resized to ``img_size`` and a central crop."""
    short = 256 if img_size == 224 else img_size
    return [
        dict(type='LoadImageFromFile'),
        dict(
            type='ResizeEdge',
            scale=short,
            edge='short',
            backend='pillow',
            interpolation='bicubic'),
        dict(type='CenterCrop', crop_size=img_size),
        dict(type='PackInputs'),
    ]


def config_text(model_cfg: dict,
                img_size: int,
                header: str,
                pipeline: Optional[list] = None) -> str:
    """A complete MMPretrain config: our runtime, the model, and ImageNet
    evaluation (``data/imagenet``, split ``val``) at ``img_size``.

    Args:
        model_cfg (dict): the ``model`` config.
        img_size (int): evaluation resolution.
        header (str): comment lines put first (each starting with ``#``).
        pipeline (list, optional): the test pipeline. Defaults to None:
            :func:`test_pipeline` of ``img_size``.

    Returns:
        str: Python source, self-contained (the runtime base is merged in).
    """
    from mmengine.config import Config
    dataloader = dict(
        batch_size=64,
        num_workers=8,
        dataset=dict(
            type='ImageNet',
            data_root='data/imagenet',
            split='val',
            pipeline=pipeline or test_pipeline(img_size)),
        sampler=dict(type='DefaultSampler', shuffle=False))
    body = '\n'.join([
        f'_base_ = [{RUNTIME_BASE!r}]',
        f'model = {pprint.pformat(model_cfg, sort_dicts=False)}',
        f'test_dataloader = {pprint.pformat(dataloader, sort_dicts=False)}',
        "test_evaluator = dict(type='Accuracy', topk=(1, 5))",
        'val_dataloader = test_dataloader',
        'val_evaluator = test_evaluator',
        'test_cfg = dict()',
        'val_cfg = dict()',
    ])
    with tempfile.TemporaryDirectory() as folder:
        path = osp.join(folder, 'converted.py')
        with open(path, 'w') as f:
            f.write(body + '\n')
        text = Config.fromfile(path).pretty_text
    return header.rstrip('\n') + '\n' + text


def config_header(template: str, **fields) -> str:
    """The comment lines put first in a converted config: ``template``
    filled with ``fields``, each line wrapped at 79 columns (continuation
    lines start with ``#   ``).

    Args:
        template (str): lines starting with ``#``, with ``{name}`` fields.
        **fields: the values of the fields.

    Returns:
        str: the header, one comment line per line.
    """
    text = template.format(**fields)
    return '\n'.join(
        '\n'.join(textwrap.wrap(line, 79, subsequent_indent='#   '))
        for line in text.splitlines())


def arch_text(arch) -> str:
    """``key=value, ...`` of an architecture ``NamedTuple``."""
    return ', '.join(f'{k}={v}' for k, v in arch._asdict().items())


def imagenet_meta(num_classes: int) -> dict:
    """``meta`` with ImageNet-1k's class names for a 1000-class model (the
    written config evaluates on ImageNet), else ``{}``."""
    from ..datasets.meta import dataset_classes, weights_meta
    return weights_meta(num_classes,
                        dataset_classes(dict(type='ImageNet')))


def _write_text(path: str, text: str) -> None:
    with open(path, 'w') as f:
        f.write(text)


def save_converted(state: Dict[str, Tensor],
                   out: str,
                   config: Optional[str] = None,
                   config_out: Optional[str] = None,
                   force: bool = False,
                   meta: Optional[dict] = None) -> None:
    """Write ``{'state_dict': state}`` (and ``'meta': meta``, e.g. the
    class names, when given) to ``out`` and ``config`` (text) to
    ``config_out``, each to a temporary name then renamed; nothing is
    written when an output exists and ``force`` is False.
    """
    check_outputs([out, config_out], force)
    with atomic_outputs([out, config_out]) as (tmp, tmp_config):
        checkpoint = {'state_dict': {k: v.contiguous()
                                     for k, v in state.items()}}
        if meta:
            checkpoint['meta'] = meta
        torch.save(checkpoint, tmp)
        if tmp_config is not None:
            _write_text(tmp_config, config)
