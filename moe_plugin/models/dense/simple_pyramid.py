"""ViTDet's simple feature pyramid: multi-scale maps from a plain ViT."""
from typing import List, Sequence, Tuple

import torch.nn as nn
from mmpretrain.models.utils import LayerNorm2d
from torch import Tensor

#: The scales ViTDet builds from the stride-16 map: strides 4, 8, 16, 32.
VITDET_SCALES = (4.0, 2.0, 1.0, 0.5)


def scale_channels(embed_dims: int, scale: float) -> int:
    """Channels of the map at ``scale``: halved per 2x upsampling (ViTDet).

    Args:
        embed_dims (int): The ViT's width ``D``.
        scale (float): 4, 2, 1 or 0.5.

    Returns:
        int: ``D / 4``, ``D / 2``, ``D`` or ``D``.
    """
    return embed_dims // int(scale) if scale > 1 else embed_dims


def _scale_op(embed_dims: int, scale: float, norm_eps: float) -> nn.Module:
    if scale == 4.0:
        return nn.Sequential(
            nn.ConvTranspose2d(embed_dims, embed_dims // 2, 2, stride=2),
            LayerNorm2d(embed_dims // 2, eps=norm_eps), nn.GELU(),
            nn.ConvTranspose2d(embed_dims // 2, embed_dims // 4, 2,
                               stride=2))
    if scale == 2.0:
        return nn.ConvTranspose2d(embed_dims, embed_dims // 2, 2, stride=2)
    if scale == 1.0:
        return nn.Identity()
    return nn.MaxPool2d(kernel_size=2, stride=2)


class SimpleFeaturePyramid(nn.Module):
    """The scale operations of ViTDet's simple feature pyramid.

    From `Exploring Plain Vision Transformer Backbones for Object Detection
    <https://arxiv.org/abs/2203.16527>`_: a stride-16 ViT map is turned into
    maps at strides 4 (two 2x2 transposed convs with LayerNorm and GELU
    between), 8 (one transposed conv), 16 (itself) and 32 (2x2 max
    pooling), of ``D/4, D/2, D, D`` channels. The per-level 1x1 and 3x3
    convs of ViTDet's neck are left to the detector's neck (MMDetection's
    ``FPN``), which needs these maps as a ResNet's or ConvNeXt's.

    Args:
        embed_dims (int): Channels ``D`` of the input maps (divisible by 4
            when scale 4 is used).
        scales (Sequence[float]): Scales, each of 4, 2, 1, 0.5. Defaults to
            ``(4.0, 2.0, 1.0, 0.5)``.
        norm_eps (float): Epsilon of the LayerNorm. Defaults to 1e-6.
    """

    def __init__(self,
                 embed_dims: int,
                 scales: Sequence[float] = VITDET_SCALES,
                 norm_eps: float = 1e-6):
        super().__init__()
        scales = tuple(float(s) for s in scales)
        bad = [s for s in scales if s not in VITDET_SCALES]
        if bad or not scales:
            raise ValueError(f'`scales` must be a non-empty sequence of '
                             f'{VITDET_SCALES}, got {scales!r}')
        if any(s > 1 for s in scales) and embed_dims % int(max(scales)):
            raise ValueError(
                f'embed_dims={embed_dims} must be divisible by '
                f'{int(max(scales))} for the scale-{max(scales)} map')
        self.scales = scales
        self.out_channels: List[int] = [
            scale_channels(embed_dims, s) for s in scales
        ]
        self.ops = nn.ModuleList(
            _scale_op(embed_dims, s, norm_eps) for s in scales)

    def forward(self, maps: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """Rescale the maps.

        Args:
            maps (Sequence[Tensor]): One map (B, D, H, W) for all scales, or
                one per scale.

        Returns:
            tuple[Tensor]: Per scale ``s``, (B, C_s, s * H, s * W) with
            ``C_s`` in :attr:`out_channels`.
        """
        if len(maps) == 1:
            maps = list(maps) * len(self.ops)
        if len(maps) != len(self.ops):
            raise ValueError(f'SimpleFeaturePyramid has {len(self.ops)} '
                             f'scales but got {len(maps)} maps')
        return tuple(op(x) for op, x in zip(self.ops, maps))
