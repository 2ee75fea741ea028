"""Dense ConvNeXt checkpoints into ``ConvNeXtMoE`` weights.

The ConvNeXt counterpart of :func:`.recycle.recycle_backbone`: a timm or
MMPretrain ConvNeXt classification checkpoint is read into MMPretrain's
key names (the canonical form), every tensor is copied, and each MoE
block's experts are built from that block's pointwise MLP
(``pointwise_conv1`` / ``pointwise_conv2``) with a method of
:mod:`.methods` that needs no calibration; the routing parameters keep the
target's fresh initialisation. Used by ``RecycleDenseInit`` on a
``ConvNeXtMoE`` and by ``tools/gen_weight/gen_vit_moe_weight.py``.
"""
import os.path as osp
import re
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .formats import load_torch_checkpoint, unwrap_state_dict
from .methods import (CALIBRATED, METHODS, RecyclingOptions, build_experts,
                      select_indices)
from .recycle import (EXPERT_GROUPS, copy_remaining, expert_group_shape,
                      whole_model_state, with_expert_noise)

#: timm ``ConvNeXt`` key -> MMPretrain ``ConvNeXt`` key (regex rules; the
#: first that matches wins). timm's ``head.norm`` is MMPretrain's final
#: ``norm3`` of a 4-stage model.
_TIMM_RULES = [
    (r'^stem\.0\.', 'downsample_layers.0.0.'),
    (r'^stem\.1\.', 'downsample_layers.0.1.'),
    (r'^stages\.(\d+)\.downsample\.0\.', r'downsample_layers.\1.0.'),
    (r'^stages\.(\d+)\.downsample\.1\.', r'downsample_layers.\1.1.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.',
     r'stages.\1.\2.depthwise_conv.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.norm\.', r'stages.\1.\2.norm.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.',
     r'stages.\1.\2.pointwise_conv1.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.',
     r'stages.\1.\2.pointwise_conv2.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.weight$',
     r'stages.\1.\2.grn.gamma'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.bias$',
     r'stages.\1.\2.grn.beta'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.gamma$', r'stages.\1.\2.gamma'),
    (r'^head\.norm\.', 'norm3.'),
]


class DenseConvNeXt(NamedTuple):
    """A dense ConvNeXt checkpoint with MMPretrain's key names.

    Attributes:
        state (dict): backbone tensors (``downsample_layers.*``,
            ``stages.S.J.*``, ``norm3.*``); 1x1-conv MLP kernels are
            stored as linear ``[out, in]`` weights.
        head (dict): ``weight`` ``[C, D]`` and ``bias`` ``[C]``, or empty.
        fmt (str): 'timm' or 'mmpretrain'.
    """
    state: Dict[str, Tensor]
    head: Dict[str, Tensor]
    fmt: str


def _linear(key: str, value: Tensor) -> Tensor:
    """timm's ``conv_mlp`` 1x1 kernels ``[out, in, 1, 1]`` as ``[out, in]``
    (MMPretrain's default ``linear_pw_conv``); GRN's ``[1, 1, 1, C]``
    parameters flattened."""
    if re.search(r'pointwise_conv[12]\.weight$', key) and value.dim() == 4:
        return value.flatten(1)
    if re.search(r'\.grn\.(gamma|beta)$', key):
        return value.flatten()
    return value


def timm_convnext_to_canonical(state: Dict[str, Tensor]) -> DenseConvNeXt:
    """timm ``ConvNeXt`` keys to MMPretrain's."""
    out, head = {}, {}
    for key, value in state.items():
        if key in ('head.fc.weight', 'head.fc.bias'):
            head[key.split('.')[-1]] = value
            continue
        for pattern, replacement in _TIMM_RULES:
            if re.match(pattern, key):
                new_key = re.sub(pattern, replacement, key)
                out[new_key] = _linear(new_key, value)
                break
        else:
            raise ValueError(f'timm checkpoint key {key!r} has no place in '
                             'a ConvNeXt (unsupported variant)')
    return DenseConvNeXt(out, head, 'timm')


def mmpretrain_convnext_to_canonical(
        state: Dict[str, Tensor]) -> DenseConvNeXt:
    """MMPretrain ``ImageClassifier`` / ``ConvNeXt`` keys."""
    out, head = {}, {}
    for key, value in state.items():
        if key.startswith('data_preprocessor.'):
            continue
        if key.startswith('head.'):
            if key in ('head.fc.weight', 'head.fc.bias'):
                head[key.split('.')[-1]] = value
            continue
        key = key[len('backbone.'):] if key.startswith('backbone.') else key
        out[key] = _linear(key, value)
    return DenseConvNeXt(out, head, 'mmpretrain')


def load_dense_convnext(path: str,
                        fmt: Optional[str] = None) -> DenseConvNeXt:
    """Read a dense timm or MMPretrain ConvNeXt checkpoint.

    Args:
        path (str): ``.pth`` / ``.bin`` / ``.safetensors`` file.
        fmt (str, optional): force 'timm' or 'mmpretrain'. Defaults to None
            (detected from the keys).

    Returns:
        DenseConvNeXt: the checkpoint with MMPretrain's key names.
    """
    if fmt not in (None, 'timm', 'mmpretrain'):
        raise ValueError(f"ConvNeXt checkpoints are 'timm' or 'mmpretrain', "
                         f'got format {fmt!r}')
    if not osp.isfile(path):
        raise FileNotFoundError(f'dense checkpoint {path!r} does not exist')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = unwrap_state_dict(load_torch_checkpoint(path))
    keys = set(state)
    if fmt is None:
        if 'stem.0.weight' in keys:
            fmt = 'timm'
        elif {'downsample_layers.0.0.weight',
              'backbone.downsample_layers.0.0.weight'} & keys:
            fmt = 'mmpretrain'
        else:
            raise ValueError(
                f'{path} is not a timm (stem.0.weight) or MMPretrain '
                f'(downsample_layers.0.0.weight) ConvNeXt checkpoint; keys '
                f'start {sorted(keys)[:4]}')
    if fmt == 'timm':
        return timm_convnext_to_canonical(state)
    return mmpretrain_convnext_to_canonical(state)


def recycle_convnext(dense: DenseConvNeXt,
                     backbone: nn.Module,
                     method: str = 'upcycle',
                     noise: float = 0.0,
                     seed: int = 0) -> Tuple[dict, dict]:
    """Build a ``ConvNeXtMoE`` state dict from a dense ConvNeXt.

    Args:
        dense (DenseConvNeXt): the dense checkpoint (same arch).
        backbone (nn.Module): the target ``ConvNeXtMoE`` (its own tensors
            are the fresh values of the routing parameters and of keys the
            checkpoint lacks, e.g. ``norm0``-``norm2`` of a detector).
        method (str): 'upcycle', 'random' or 'uniform'. Defaults to
            'upcycle'.
        noise (float): std of Gaussian noise on the expert kernels.
            Defaults to 0.
        seed (int): seed of the sampling and the noise. Defaults to 0.

    Returns:
        tuple: the state dict (every key of ``backbone``) and a report with
        ``copied``, ``sampled``, ``fresh``, ``unused`` key lists and
        ``experts`` (per MoE block and group, the neuron indices).
    """
    if method in CALIBRATED or method not in METHODS:
        raise ValueError(
            f'ConvNeXt recycling takes the methods without calibration '
            f"('upcycle', 'random', 'uniform'), got {method!r}")
    if noise < 0:
        raise ValueError(f'noise must be >= 0, got {noise}')
    if not hasattr(backbone, 'moe_blocks'):
        raise ValueError(f'the target must be a ConvNeXtMoE, got '
                         f'{type(backbone).__name__}')
    options = RecyclingOptions(method=method, seed=seed, noise=noise)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    target = backbone.state_dict()
    report = dict(copied=[], sampled=[], fresh=[], experts={})
    state, used, moe_prefixes = {}, set(), []
    for stage, blocks in enumerate(backbone.moe_blocks):
        for index in blocks:
            block = f'stages.{stage}.{index}'
            moe_prefixes.append(f'{block}.moe.')
            names = [f'{block}.pointwise_conv{i}.{p}' for i in (1, 2)
                     for p in ('weight', 'bias')]
            missing = [n for n in names if n not in dense.state]
            if missing:
                raise ValueError(f'dense checkpoint lacks {missing} for MoE '
                                 f'block {block}')
            fc1_w, fc1_b, fc2_w, fc2_b = (dense.state[n] for n in names)
            used.update(names)
            used.update(k for k in dense.state
                        if k.startswith(f'{block}.grn.'))
            layer = backbone.stages[stage][index].moe
            block_report = {}
            for attr, name in EXPERT_GROUPS:
                experts = getattr(layer, attr, None)
                if experts is None:
                    continue
                count, embed_dims, width = expert_group_shape(experts)
                if embed_dims != fc1_w.shape[1]:
                    raise ValueError(
                        f'{block}: checkpoint width {fc1_w.shape[1]} vs '
                        f'model {embed_dims}')
                indices = select_indices(options, fc1_w.shape[0], width,
                                         count, rng)
                tensors = build_experts(fc1_w, fc1_b, fc2_w, fc2_b, indices)
                for tensor_name, value in zip(('w1', 'b1', 'w2', 'b2'),
                                              tensors):
                    key = f'{block}.moe.{attr}.{tensor_name}'
                    value = with_expert_noise(tensor_name, value, noise,
                                              generator)
                    state[key] = value.to(target[key].dtype)
                    report['sampled'].append(key)
                block_report[name] = indices.tolist()
            report['experts'][block] = block_report
    copy_remaining(target, dense.state, state, used, report,
                   skip=tuple(moe_prefixes))
    trunk_fresh = [
        k for k in report['fresh']
        if k.startswith(('stages.', 'downsample_layers.'))
        and not k.startswith(tuple(moe_prefixes))
    ]
    extra = sorted(k for k in set(dense.state) - used
                   if k.startswith(('stages.', 'downsample_layers.')))
    if trunk_fresh or extra:
        raise ValueError(
            f'the dense ConvNeXt does not have the target\'s arch: model keys '
            f'missing from it {trunk_fresh[:4]}, checkpoint keys the model '
            f'lacks {extra[:4]}')
    report['unused'] = sorted(set(dense.state) - used)
    return state, report


def recycle_convnext_model(dense: DenseConvNeXt,
                           model: nn.Module,
                           fresh_head: bool = False,
                           **kwargs) -> Tuple[dict, dict]:
    """:func:`recycle_convnext` for a whole model (``backbone.`` keys):
    a classifier's ``head.fc`` is copied when its shape fits (unless
    ``fresh_head``); everything else of a detector or segmentor (neck,
    heads) keeps the model's own initialisation.

    Args:
        dense (DenseConvNeXt): the dense checkpoint.
        model (nn.Module): a classifier, detector or segmentor whose
            ``backbone`` is a ``ConvNeXtMoE``.
        fresh_head (bool): keep the model's own classifier head. Defaults
            to False.
        **kwargs: ``method``, ``noise``, ``seed`` of
            :func:`recycle_convnext`.

    Returns:
        tuple: the model's full state dict and the report.
    """
    backbone_state, report = recycle_convnext(dense, model.backbone,
                                              **kwargs)
    head_sources = {}
    if not fresh_head:
        head_sources = {
            'head.fc.weight': dense.head.get('weight'),
            'head.fc.bias': dense.head.get('bias')
        }
    state = whole_model_state(model, backbone_state, report, head_sources)
    return state, report
