"""ConvNeXt whose chosen blocks use an MoE layer as their pointwise MLP."""
import numbers
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from mmpretrain.models.backbones import ConvNeXt
from mmpretrain.registry import MODELS
from torch import Tensor

from ...layers.experts import act_name
from ..builder import build_moe_layer
from .common import LOADING_INITS, check_out_indices, init_weights_loading_last


class ConvNeXtMoEBlock(BaseModule):
    """A ConvNeXt block whose pointwise MLP is an MoE layer.

    ``x + drop_path(gamma * MoE(norm(dwconv(x))))``, where the MoE acts on the
    ``H * W`` spatial tokens of each image (``[B, C, H, W]`` → ``[B, HW, C]``
    → MoE → back). The depthwise conv, norm, layer scale ``gamma`` and drop
    path are the dense block's own modules, so their parameter names stay
    MMPretrain's; the dense block's ``pointwise_conv1``, ``act``, ``grn`` and
    ``pointwise_conv2`` are dropped.

    Args:
        dense_block (nn.Module): MMPretrain's ``ConvNeXtBlock`` to convert.
        moe (nn.Module): The MoE layer, ``forward(x: [B, N, C]) -> [B, N, C]``
            without the residual.
    """

    def __init__(self, dense_block: nn.Module, moe: nn.Module):
        super().__init__()
        if dense_block.with_cp and getattr(
                getattr(moe, 'router', None), 'bias_balancing', False):
            # The recomputation would update the bias a second time and
            # route with the updated one.
            raise ValueError(
                'with_cp=True cannot be combined with moe_cfg '
                'bias_balancing=True: activation checkpointing re-runs the '
                'forward pass that updates the bias')
        self.with_cp = dense_block.with_cp
        self.depthwise_conv = dense_block.depthwise_conv
        self.norm = dense_block.norm
        self.moe = moe
        self.gamma = dense_block.gamma
        self.drop_path = dense_block.drop_path

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x (Tensor): Feature map of shape (B, C, H, W).

        Returns:
            Tensor: Shape (B, C, H, W).
        """

        def _inner_forward(x):
            shortcut = x
            x = self.depthwise_conv(x)
            batch, channels, height, width = x.shape
            x = x.permute(0, 2, 3, 1)
            x = self.norm(x, data_format='channel_last')
            x = self.moe(x.reshape(batch, height * width, channels))
            x = x.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
            if self.gamma is not None:
                x = x.mul(self.gamma.view(1, -1, 1, 1))
            return shortcut + self.drop_path(x)

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


def parse_moe_blocks(moe_blocks: Optional[Sequence], depths: Sequence[int],
                     key: str = 'moe_blocks') -> List[List[int]]:
    """Turn a per-stage block selection into sorted 0-based block indices.

    Args:
        moe_blocks (Sequence | None): One entry per stage: a sequence of
            block indices within the stage (negative counts from the end),
            ``'all'``, or None / ``[]`` for no MoE block. None selects nothing.
        depths (Sequence[int]): Number of blocks of each stage.
        key (str): Config key named in errors. Defaults to 'moe_blocks'.

    Returns:
        list[list[int]]: Sorted, unique, non-negative indices per stage.
    """
    if moe_blocks is None:
        return [[] for _ in depths]
    if isinstance(moe_blocks, str) or not isinstance(moe_blocks, Sequence):
        raise ValueError(
            f'`{key}` must be a sequence with one entry per stage '
            f'({len(depths)} stages), got {moe_blocks!r}')
    if len(moe_blocks) != len(depths):
        raise ValueError(f'`{key}` needs one entry per stage ({len(depths)} '
                         f'stages), got {len(moe_blocks)}: {moe_blocks!r}')
    parsed = []
    for stage, (blocks, depth) in enumerate(zip(moe_blocks, depths)):
        if blocks is None:
            blocks = []
        elif blocks == 'all':
            blocks = range(depth)
        elif isinstance(blocks, str) or not isinstance(blocks, Sequence):
            raise ValueError(
                f'`{key}[{stage}]` must be a sequence of block indices, '
                f"'all' or None, got {blocks!r}")
        indices = set()
        for index in blocks:
            if (isinstance(index, bool)
                    or not isinstance(index, numbers.Integral)
                    or not -depth <= index < depth):
                raise ValueError(
                    f'`{key}[{stage}]` has block index {index!r}, but stage '
                    f'{stage} has {depth} blocks (valid: {-depth}..'
                    f'{depth - 1})')
            indices.add(int(index) % depth)
        parsed.append(sorted(indices))
    return parsed


@MODELS.register_module()
class ConvNeXtMoE(ConvNeXt):
    """ConvNeXt with MoE layers in place of chosen blocks' pointwise MLPs.

    MMPretrain's ``ConvNeXt`` is built first; each chosen block then becomes
    a :class:`ConvNeXtMoEBlock` whose MoE layer sees the block's ``H * W``
    spatial positions as tokens. All other parameters keep MMPretrain's
    names, so a dense ConvNeXt checkpoint loads with only the replaced MLPs
    (``stages.S.J.pointwise_conv{1,2}``, ``grn``) unexpected and the MoE
    parameters missing. ``get_layer_depth`` is MMPretrain's, except that an
    MoE layer's routing parameters (those outside its expert modules, whose
    names contain ``experts``) are put at the top depth, the experts staying
    at their block's depth.

    C-JetMoE-F of `MoE Jetpack <https://arxiv.org/abs/2406.04801>`_ is
    ``arch='tiny'``, ``moe_blocks=[[], [], [3, 4, 5, 6, 7, 8], 'all']`` and
    per-stage ``moe_cfg`` of SpheroMoE with 98 + 196 and 24 + 48 experts.

    Args:
        moe_blocks (Sequence, optional): Per stage, the MoE block indices
            within the stage (negative counts from the end), ``'all'``, or
            None / ``[]``. None means no MoE block (the dense ConvNeXt).
            Defaults to None.
        moe_cfg (dict | Sequence[dict | None], optional): The MoE layer config
            (see :func:`~moe_plugin.models.build_moe_layer`), one for all
            stages or one per stage (None for stages without MoE blocks).
            ``embed_dims`` (the stage's channels), ``feedforward_channels``
            (the dense MLP's hidden width), ``act`` (from ``act_cfg``) and
            ``num_tokens`` (``H * W`` of the stage at ``img_size``) are filled
            in unless given and if the layer accepts them. The block keeps
            its own drop path, so the layer's own ``drop_path_rate`` is not
            filled in. Defaults to ``dict(type='SparseMoE')``.
        img_size (int | Sequence[int]): Input size used to compute each
            stage's token count. Defaults to 224.
        **kwargs: Arguments of MMPretrain's ``ConvNeXt`` (``arch``,
            ``in_channels``, ``stem_patch_size``, ``norm_cfg``, ``act_cfg``,
            ``drop_path_rate``, ``layer_scale_init_value``, ``out_indices``,
            ``frozen_stages``, ``gap_before_final_norm``, ``with_cp``, ...).
    """

    def __init__(self,
                 moe_blocks: Optional[Sequence] = None,
                 moe_cfg: Union[dict, Sequence, None] = None,
                 img_size: Union[int, Sequence[int]] = 224,
                 **kwargs):
        frozen_stages = kwargs.pop('frozen_stages', 0)
        if 'out_indices' in kwargs:
            arch = kwargs.get('arch', 'tiny')
            settings = (self.arch_settings.get(arch) if isinstance(
                arch, str) else arch)
            if isinstance(settings, dict) and 'depths' in settings:
                kwargs['out_indices'] = check_out_indices(
                    kwargs['out_indices'], len(settings['depths']), 'stages')
        device = torch.get_default_device()
        # MMPretrain's ConvNeXt reads its drop-path rates with .item(),
        # which fails under a meta default device (used to count the
        # parameters of big models): build the dense part on the CPU and
        # move it. Freezing waits until the MoE blocks exist.
        with torch.device('cpu'):
            super().__init__(frozen_stages=0, **kwargs)
        if device.type == 'meta':
            self.to(device)
        self.moe_blocks = parse_moe_blocks(moe_blocks, self.depths)
        stage_cfgs = self._stage_moe_cfgs(moe_cfg)
        if isinstance(img_size, numbers.Integral):
            img_size = (int(img_size), int(img_size))
        if len(img_size) != 2 or min(img_size) < 1:
            raise ValueError(
                f'`img_size` must be a positive int or (H, W), got '
                f'{img_size!r}')
        self.img_size = tuple(img_size)
        act = act_name(kwargs.get('act_cfg', dict(type='GELU')))
        stride = kwargs.get('stem_patch_size', 4)
        for stage, blocks in enumerate(self.moe_blocks):
            height = self.img_size[0] // stride
            width = self.img_size[1] // stride
            stride *= 2
            for index in blocks:
                dense = self.stages[stage][index]
                defaults = dict(num_tokens=height * width)
                if act is not None:
                    defaults['act'] = act
                moe = build_moe_layer(
                    stage_cfgs[stage],
                    embed_dims=self.channels[stage],
                    feedforward_channels=_hidden_width(dense),
                    **defaults)
                self.stages[stage][index] = ConvNeXtMoEBlock(dense, moe)
        self.frozen_stages = frozen_stages
        self._freeze_stages()

    def _stage_moe_cfgs(self, moe_cfg) -> List[Optional[dict]]:
        """One MoE config per stage, checked against ``moe_blocks``."""
        if moe_cfg is None:
            moe_cfg = dict(type='SparseMoE')
        if isinstance(moe_cfg, dict):
            return [moe_cfg] * self.num_stages
        if (isinstance(moe_cfg, str) or not isinstance(moe_cfg, Sequence)
                or len(moe_cfg) != self.num_stages):
            raise ValueError(
                f'`moe_cfg` must be a dict or one dict (or None) per stage '
                f'({self.num_stages} stages), got {moe_cfg!r}')
        for stage, cfg in enumerate(moe_cfg):
            if cfg is None and self.moe_blocks[stage]:
                raise ValueError(
                    f'`moe_cfg[{stage}]` is None but `moe_blocks[{stage}]` '
                    f'selects blocks {self.moe_blocks[stage]}')
            if cfg is not None and not isinstance(cfg, dict):
                raise ValueError(f'`moe_cfg[{stage}]` must be a dict or None, '
                                 f'got {cfg!r}')
        return list(moe_cfg)

    #: ``init_cfg`` types applied after every other initialisation.
    LOADING_INITS = LOADING_INITS

    def init_weights(self):
        """MMPretrain's initialisation, then any ``RecycleDenseInit`` of
        ``init_cfg`` (a dense ConvNeXt checkpoint, see
        :mod:`moe_plugin.recycling.convnext`)."""
        init_weights_loading_last(self, super().init_weights)

    def train(self, mode: bool = True) -> 'ConvNeXtMoE':
        """Set the training mode, keeping frozen stages in eval mode.

        Returns ``self`` as ``nn.Module.train`` does (MMPretrain's
        ``ConvNeXt.train`` returns None).
        """
        super().train(mode)
        return self

    def get_layer_depth(self, param_name: str, prefix: str = ''):
        """Get the layer-wise depth of a parameter.

        As MMPretrain's ``ConvNeXt.get_layer_depth``, but an MoE layer's
        routing parameters (outside modules named ``*experts*``) are at the
        top depth (that of the final norm and the head), so layer decay
        leaves their lr unscaled.

        Args:
            param_name (str): The name of the parameter.
            prefix (str): The prefix for the parameter. Defaults to ''.

        Returns:
            Tuple[int, int]: The layer-wise depth and the number of layers.
        """
        layer_id, num_layers = super().get_layer_depth(param_name, prefix)
        if param_name.startswith(prefix):
            parts = param_name[len(prefix):].split('.')
            if (len(parts) > 4 and parts[0] == 'stages' and parts[3] == 'moe'
                    and 'experts' not in parts[4]):
                return num_layers - 1, num_layers
        return layer_id, num_layers


def _hidden_width(block: nn.Module) -> int:
    """Hidden width of a ConvNeXt block's pointwise MLP."""
    conv = block.pointwise_conv1
    return getattr(conv, 'out_features', None) or conv.out_channels
