"""V-MoE: MMPretrain's Vision Transformer with sparse MoE blocks."""
import numbers
import re
from functools import partial
from typing import List, Optional, Sequence, Union

import torch.nn as nn
from mmengine.model import BaseModule
from mmpretrain.models import VisionTransformer
from mmpretrain.registry import MODELS
from timm.layers import AttentionPoolLatent
from torch import Tensor

from ...layers.expert_parallel import full_parameter_shapes
from ...layers.experts import gelu_approximation
from ..builder import build_moe_layer
from .common import LOADING_INITS, check_out_indices, init_weights_loading_last


def parse_moe_layers(moe_layers: Union[str, Sequence[int], None],
                     num_layers: int) -> List[int]:
    """Turn a ``moe_layers`` setting into sorted 0-based block indices.

    Args:
        moe_layers (str | Sequence[int] | None): ``'every-n'`` (blocks
            ``n-1, 2n-1, ...``), ``'last-n'`` (the last ``n`` odd blocks, as
            V-MoE), ``'last-n-blocks'`` (the last ``n`` blocks, consecutive,
            as Soft MoE and MoE Jetpack), an explicit sequence of 0-based
            indices, or None / an empty sequence for no MoE block.
        num_layers (int): Number of blocks ``L``.

    Returns:
        list[int]: The MoE block indices in increasing order.

    Examples:
        >>> parse_moe_layers('every-2', 12)
        [1, 3, 5, 7, 9, 11]
        >>> parse_moe_layers('last-2', 8)
        [5, 7]
        >>> parse_moe_layers('last-6-blocks', 12)
        [6, 7, 8, 9, 10, 11]
    """
    if moe_layers is None:
        return []
    if isinstance(moe_layers, str):
        match = re.fullmatch(r'(every|last)-(\d+)(-blocks)?', moe_layers)
        if match is None or (match.group(3) and match.group(1) == 'every'):
            raise ValueError(
                f"`moe_layers` must be 'every-<n>', 'last-<n>', "
                f"'last-<n>-blocks' or a list of block indices, got "
                f'{moe_layers!r}')
        kind, n = match.group(1), int(match.group(2))
        if n < 1:
            raise ValueError(f'`moe_layers`={moe_layers!r} needs n >= 1')
        if kind == 'every':
            indices = list(range(n - 1, num_layers, n))
        elif match.group(3):
            if n > num_layers:
                raise ValueError(f'`moe_layers`={moe_layers!r} asks for {n} '
                                 f'blocks but the model has {num_layers}')
            indices = list(range(num_layers - n, num_layers))
        else:
            odd = list(range(1, num_layers, 2))
            if n > len(odd):
                raise ValueError(
                    f'`moe_layers`={moe_layers!r} asks for {n} odd blocks '
                    f'but {num_layers} blocks have only {len(odd)}')
            indices = odd[-n:]
        if not indices:
            raise ValueError(f'`moe_layers`={moe_layers!r} selects no block '
                             f'out of {num_layers}')
        return indices
    indices = list(moe_layers)
    for index in indices:
        if (isinstance(index, bool) or not isinstance(index, numbers.Integral)
                or not 0 <= index < num_layers):
            raise ValueError(
                f'`moe_layers` index {index!r} is not a block index in '
                f'[0, {num_layers}) (got moe_layers={moe_layers!r})')
    if len(set(indices)) != len(indices):
        raise ValueError(f'`moe_layers`={moe_layers!r} has duplicate indices')
    return sorted(int(index) for index in indices)


class MoETransformerEncoderLayer(BaseModule):
    """A ViT encoder block whose FFN is an MoE layer.

    ``x = x + attn(ln1(x)); x = x + drop_path(gamma2(ffn(ln2(x))))``. It
    adopts ``ln1``, ``attn``, ``ln2``, the drop path and the layer scale of a
    dense MMPretrain ``TransformerEncoderLayer`` so that their parameter names
    do not change; the MoE layer's parameters sit directly under ``ffn``.

    Args:
        dense_layer (nn.Module): The dense block being replaced.
        ffn (nn.Module): The MoE layer, ``[B, N, D] -> [B, N, D]`` without the
            residual.
    """

    def __init__(self, dense_layer: nn.Module, ffn: nn.Module):
        super().__init__()
        self.embed_dims = dense_layer.embed_dims
        self.ln1 = dense_layer.ln1
        self.attn = dense_layer.attn
        self.ln2 = dense_layer.ln2
        self.ffn = ffn
        self.gamma2 = getattr(dense_layer.ffn, 'gamma2', nn.Identity())
        self.drop_path = getattr(dense_layer.ffn, 'dropout_layer',
                                 nn.Identity())

    @property
    def norm1(self) -> nn.Module:
        return self.ln1

    @property
    def norm2(self) -> nn.Module:
        return self.ln2

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to tokens ``x`` of shape ``[B, N, D]``."""
        x = x + self.attn(self.ln1(x))
        return x + self.drop_path(self.gamma2(self.ffn(self.ln2(x))))


@MODELS.register_module()
class VisionMoE(VisionTransformer):
    """Vision Transformer with sparse Mixture-of-Experts blocks (V-MoE).

    A paper implementation of `Scaling Vision with Sparse Mixture of Experts
    <https://arxiv.org/abs/2106.05974>`_. It is MMPretrain's
    ``VisionTransformer`` whose blocks listed by ``moe_layers`` have their MLP
    replaced by an MoE layer built from ``moe_cfg``. The dense parameters keep
    MMPretrain's names, so a ``VisionTransformer`` checkpoint loads strictly
    into ``moe_layers=[]`` and, but for the replaced MLPs, into any
    ``VisionMoE``. An MoE block ``i`` holds its layer's parameters under
    ``layers.{i}.ffn`` (e.g. ``layers.5.ffn.router.weight``) and its layer
    scale, if any, under ``layers.{i}.gamma2``.

    Loading a checkpoint resizes ``pos_embed`` to the model's image size and
    raises ``ValueError`` for any other parameter whose shape differs.

    Args:
        arch (str | dict): A name of :attr:`arch_zoo`: V-MoE's sizes
            ``'vmoe-s'`` (512 / 8 blocks / 2048 / 8 heads), ``'vmoe-b'``,
            ``'vmoe-l'``, ``'vmoe-h'``, DeiT's ``'deit-tiny'``,
            ``'deit-small'``, ``'deit-base'`` and MMPretrain's others; or a
            dict with ``embed_dims``, ``num_layers``, ``num_heads`` and
            ``feedforward_channels``. Defaults to ``'vmoe-s'``.
        img_size (int | tuple): Input image size. Defaults to 224.
        patch_size (int | tuple): Patch size. Defaults to 32.
        moe_layers (str | Sequence[int] | None): ``'every-n'``, ``'last-n'``
            (the last n odd blocks) or 0-based block indices; see
            :func:`parse_moe_layers`. Defaults to ``'last-2'``.
        moe_cfg (dict, optional): Config of the MoE layer (``type`` and its
            arguments); ``embed_dims``, ``feedforward_channels``, ``act``,
            ``num_tokens`` (patches + class token) and ``drop_path_rate``
            are filled in from the backbone where the layer takes them.
            Defaults to ``dict(type='SparseMoE')``.
        moe_drop_path_rate (float): Per-sample drop path inside the MoE
            layers that take a ``drop_path_rate`` (``SpheroMoE``), rising
            linearly from 0 at the first block to this value at the last
            (MoE Jetpack's ``moe_drop_path_rate``). Defaults to 0.
        act (str): FFN activation of every block, dense and MoE:
            ``'gelu_tanh'`` (tanh approximation, as V-MoE) or ``'gelu'``
            (exact, as MMPretrain and DeiT). Defaults to ``'gelu_tanh'``.
        out_type (str): MMPretrain's ``'cls_token'``, ``'featmap'``,
            ``'avg_featmap'`` (mean of the patch tokens, then an extra
            LayerNorm ``ln2``), ``'raw'``, or V-MoE's heads:

            - ``'token'``: alias of ``'cls_token'``, shape (B, C).
            - ``'gap'``: mean of the patch tokens after the final norm, no
              extra norm, shape (B, C).
            - ``'map'``: multi-head attention pooling of the patch tokens
              after the final norm (timm's ``AttentionPoolLatent`` as
              ``attn_pool``: a learned probe attends over the tokens, then
              LayerNorm and an MLP with a residual), shape (B, C).

            Defaults to ``'cls_token'``.
        with_cls_token (bool): Whether to prepend a class token. V-MoE's
            ``gap`` and ``map`` models have none (False). Defaults to True.
        frozen_stages (int): Blocks to freeze, as in ``VisionTransformer``;
            freezing all of them also freezes ``attn_pool``. Defaults to -1.
        layer_cfgs (Sequence | dict): Per-block configs, as in
            ``VisionTransformer``; an ``act_cfg`` given here overrides
            ``act`` for that dense block. Defaults to an empty dict.
        **kwargs: The other arguments of MMPretrain's ``VisionTransformer``
            (``in_channels``, ``out_indices``, ``drop_rate``,
            ``drop_path_rate``, ``qkv_bias``, ``norm_cfg`` (LayerNorm with eps
            1e-6 by default), ``final_norm``, ``interpolate_mode``,
            ``layer_scale_init_value``, ``patch_cfg``, ``pre_norm``,
            ``init_cfg``).
    """
    arch_zoo = {
        **VisionTransformer.arch_zoo,
        **dict.fromkeys(
            ['vmoe-s', 'vmoe-small', 'v-moe-s'], {
                'embed_dims': 512,
                'num_layers': 8,
                'num_heads': 8,
                'feedforward_channels': 2048
            }),
        **dict.fromkeys(
            ['vmoe-b', 'vmoe-base', 'v-moe-b'], {
                'embed_dims': 768,
                'num_layers': 12,
                'num_heads': 12,
                'feedforward_channels': 3072
            }),
        **dict.fromkeys(
            ['vmoe-l', 'vmoe-large', 'v-moe-l'], {
                'embed_dims': 1024,
                'num_layers': 24,
                'num_heads': 16,
                'feedforward_channels': 4096
            }),
        **dict.fromkeys(
            ['vmoe-h', 'vmoe-huge', 'v-moe-h'], {
                'embed_dims': 1280,
                'num_layers': 32,
                'num_heads': 16,
                'feedforward_channels': 5120
            }),
    }
    OUT_TYPES = VisionTransformer.OUT_TYPES | {'gap', 'map'}
    OUT_TYPE_ALIASES = {'token': 'cls_token'}
    ESSENTIAL_KEYS = ('embed_dims', 'num_layers', 'num_heads',
                      'feedforward_channels')

    def __init__(self,
                 arch: Union[str, dict] = 'vmoe-s',
                 img_size: int = 224,
                 patch_size: int = 32,
                 moe_layers: Union[str, Sequence[int], None] = 'last-2',
                 moe_cfg: Optional[dict] = None,
                 moe_drop_path_rate: float = 0.0,
                 act: str = 'gelu_tanh',
                 out_type: str = 'cls_token',
                 with_cls_token: bool = True,
                 frozen_stages: int = -1,
                 layer_cfgs: Union[Sequence[dict], dict] = dict(),
                 **kwargs):
        arch_settings = self._resolve_arch(arch)
        num_layers = arch_settings['num_layers']
        moe_indices = parse_moe_layers(moe_layers, num_layers)
        approximate = gelu_approximation(act, '`act`')
        if 'out_indices' in kwargs:
            kwargs['out_indices'] = check_out_indices(kwargs['out_indices'],
                                                      num_layers)
        out_type = self.OUT_TYPE_ALIASES.get(out_type, out_type)
        if isinstance(layer_cfgs, dict):
            layer_cfgs = [layer_cfgs] * num_layers
        if len(layer_cfgs) != num_layers:
            raise ValueError(f'`layer_cfgs` has {len(layer_cfgs)} entries '
                             f'for {num_layers} blocks')
        layer_cfgs = [
            dict(dict(act_cfg=dict(type='GELU', approximate=approximate)),
                 **cfg) for cfg in layer_cfgs
        ]
        # Freezing waits until the MoE blocks and attn_pool exist.
        super().__init__(
            arch=arch_settings,
            img_size=img_size,
            patch_size=patch_size,
            out_type=out_type,
            with_cls_token=with_cls_token,
            frozen_stages=-1,
            layer_cfgs=layer_cfgs,
            **kwargs)

        self.moe_layers = tuple(moe_indices)
        moe_cfg = dict(type='SparseMoE') if moe_cfg is None else moe_cfg
        if not 0.0 <= moe_drop_path_rate < 1.0:
            raise ValueError(f'`moe_drop_path_rate` must be in [0, 1), got '
                             f'{moe_drop_path_rate}')
        # Per-sample drop path inside the MoE layers that take one, growing
        # linearly with depth (MoE Jetpack's rule).
        moe_dpr = [
            moe_drop_path_rate * i / max(num_layers - 1, 1)
            for i in range(num_layers)
        ]
        num_tokens = (self.patch_resolution[0] * self.patch_resolution[1] +
                      self.num_extra_tokens)
        for i in self.moe_layers:
            moe = build_moe_layer(
                moe_cfg,
                embed_dims=self.embed_dims,
                feedforward_channels=arch_settings['feedforward_channels'],
                act=act,
                num_tokens=num_tokens,
                drop_path_rate=moe_dpr[i])
            self.layers[i] = MoETransformerEncoderLayer(self.layers[i], moe)

        if self.out_type == 'map':
            norm_cfg = kwargs.get('norm_cfg', dict(type='LN', eps=1e-6))
            self.attn_pool = AttentionPoolLatent(
                self.embed_dims,
                num_heads=arch_settings['num_heads'],
                mlp_ratio=arch_settings['feedforward_channels'] /
                self.embed_dims,
                norm_layer=partial(
                    nn.LayerNorm, eps=norm_cfg.get('eps', 1e-5)),
                act_layer=partial(nn.GELU, approximate=approximate))

        self._register_load_state_dict_pre_hook(self._check_shapes)
        self.frozen_stages = frozen_stages
        if self.frozen_stages > 0:
            self._freeze_stages()

    @classmethod
    def _resolve_arch(cls, arch: Union[str, dict]) -> dict:
        """Return the settings dict of ``arch`` or raise ``ValueError``."""
        if isinstance(arch, str):
            settings = cls.arch_zoo.get(arch.lower())
            if settings is None:
                raise ValueError(f'Unknown `arch` {arch!r}; choose from '
                                 f'{sorted(cls.arch_zoo)} or give a dict')
            return dict(settings)
        if not isinstance(arch, dict) or not set(
                cls.ESSENTIAL_KEYS) <= set(arch):
            raise ValueError(f'A custom `arch` must be a dict with keys '
                             f'{list(cls.ESSENTIAL_KEYS)}, got {arch!r}')
        return dict(arch)

    def _check_shapes(self, state_dict: dict, prefix: str, *args,
                      **kwargs) -> None:
        """Load pre-hook: reject checkpoint tensors of the wrong shape.

        Runs after MMPretrain's ``_prepare_pos_embed``, which resizes
        ``pos_embed``; ``pos_embed`` itself is left to it.
        """
        # Expert-parallel shards count with the shape of all their experts.
        for name, shape in full_parameter_shapes(self).items():
            key = prefix + name
            if name == 'pos_embed' or key not in state_dict:
                continue
            ckpt_shape = tuple(state_dict[key].shape)
            if ckpt_shape != shape:
                raise ValueError(f'{key}: checkpoint {ckpt_shape} vs model '
                                 f'{shape}')

    def get_layer_depth(self, param_name: str, prefix: str = ''):
        """Layer-wise depth of a parameter, for MMPretrain's layer decay.

        As ``VisionTransformer.get_layer_depth``, except that the routing
        parameters of an MoE block (everything of the layer outside modules
        named ``*experts*``: router, slots, temperatures, slot norms, scale)
        sit at the top depth, with the head, while its experts stay at their
        block's depth (MoE Jetpack's rule; ``ConvNeXtMoE`` does the same).

        Args:
            param_name (str): The name of the parameter.
            prefix (str): The prefix for the parameter. Defaults to ''.

        Returns:
            Tuple[int, int]: The layer depth and the number of depths.
        """
        layer_depth, num_depths = super().get_layer_depth(param_name, prefix)
        parts = param_name[len(prefix):].split('.')
        if (param_name.startswith(prefix) and len(parts) > 3
                and parts[0] == 'layers' and int(parts[1]) in self.moe_layers
                and parts[2] == 'ffn'
                and 'experts' not in parts[3]):
            return num_depths - 1, num_depths
        return layer_depth, num_depths

    #: ``init_cfg`` types applied after every other initialisation (they
    #: load weights: children's and the position embedding's own init
    #: would otherwise overwrite them).
    LOADING_INITS = LOADING_INITS

    def init_weights(self):
        """MMPretrain's initialisation, then any ``RecycleDenseInit`` of
        ``init_cfg`` (see :mod:`moe_plugin.recycling.initializer`)."""
        init_weights_loading_last(self, super().init_weights)

    def train(self, mode: bool = True) -> 'VisionMoE':
        """Set the training mode; returns ``self`` as ``nn.Module.train``
        does (MMPretrain's ``VisionTransformer.train`` returns None, which
        breaks ``model.eval()`` chains)."""
        super().train(mode)
        return self

    def _freeze_stages(self) -> None:
        super()._freeze_stages()
        if self.frozen_stages == len(self.layers) and self.out_type == 'map':
            self.attn_pool.eval()
            for param in self.attn_pool.parameters():
                param.requires_grad = False

    def _format_output(self, x: Tensor, hw) -> Tensor:
        if self.out_type == 'gap':
            return x[:, self.num_extra_tokens:].mean(dim=1)
        if self.out_type == 'map':
            return self.attn_pool(x[:, self.num_extra_tokens:])
        return super()._format_output(x, hw)
