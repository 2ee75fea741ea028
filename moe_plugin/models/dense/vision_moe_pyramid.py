"""V-MoE as a detection / segmentation backbone: multi-scale feature maps."""
from typing import Sequence, Tuple, Union

from mmpretrain.registry import MODELS
from torch import Tensor

from ..backbones import VisionMoE
from ..backbones.common import check_out_indices
from .simple_pyramid import VITDET_SCALES, SimpleFeaturePyramid


@MODELS.register_module()
class VisionMoEPyramid(VisionMoE):
    """``VisionMoE`` with a simple feature pyramid (ViTDet) on its outputs.

    The ViT's patch-token maps of the blocks in ``out_indices`` (stride
    ``patch_size``, 16 for ViTDet) go through the scale operations of
    `ViTDet <https://arxiv.org/abs/2203.16527>`_
    (:class:`SimpleFeaturePyramid`):

    - one index (ViTDet: the last block): every scale is made from that one
      map;
    - one index per scale (as BEiT's and MMSegmentation's UperNet recipes):
      scale ``i`` from the map of ``out_indices[i]``.

    With the default scales ``(4, 2, 1, 0.5)`` and patch size 16 the outputs
    are at strides 4, 8, 16, 32 with ``D/4, D/2, D, D`` channels
    (:attr:`out_channels`), so MMDetection's ``FPN`` and MMSegmentation's
    ``UPerHead`` take them as a ConvNeXt's. ViTDet's windowed attention and
    relative position biases are not used: the blocks stay those of the
    classification checkpoint, which therefore loads strictly into every
    key but the pyramid's (``pyramid.*``, fresh) and the replaced MLPs.

    For the plain maps of the ``out_indices`` blocks (MMSegmentation's
    ``VisionTransformer`` outputs, to be followed by its ``MultiLevelNeck``),
    use ``VisionMoE(out_type='featmap', out_indices=...)`` instead.

    Args:
        out_indices (int | Sequence[int]): Blocks whose maps feed the
            pyramid: one, or one per scale. Defaults to -1 (the last).
        scales (Sequence[float]): Pyramid scales relative to the ViT map,
            each of 4, 2, 1, 0.5. Defaults to ``(4.0, 2.0, 1.0, 0.5)``.
        final_norm (bool): Final LayerNorm after the last block, as
            ``VisionMoE``. Defaults to True.
        **kwargs: ``VisionMoE``'s arguments (``arch``, ``img_size``,
            ``patch_size``, ``moe_layers``, ``moe_cfg``, ``act``,
            ``drop_path_rate``, ``with_cls_token``, ``init_cfg`` (with
            ``RecycleDenseInit``), ...). ``out_type`` is always
            ``'featmap'``.
    """

    def __init__(self,
                 out_indices: Union[int, Sequence[int]] = -1,
                 scales: Sequence[float] = VITDET_SCALES,
                 final_norm: bool = True,
                 **kwargs):
        if kwargs.pop('out_type', 'featmap') != 'featmap':
            raise ValueError('VisionMoEPyramid outputs feature maps: '
                             "`out_type` must be 'featmap' (or left out)")
        arch = self._resolve_arch(kwargs.get('arch', 'vmoe-s'))
        indices = check_out_indices(out_indices, arch['num_layers'])
        if len(indices) not in (1, len(scales)):
            raise ValueError(
                f'`out_indices`={out_indices!r} gives {len(indices)} maps '
                f'for {len(scales)} pyramid scales {tuple(scales)}: give '
                'one index or one per scale')
        super().__init__(
            out_indices=indices,
            out_type='featmap',
            final_norm=final_norm,
            **kwargs)
        self.pyramid = SimpleFeaturePyramid(
            self.embed_dims,
            scales,
            norm_eps=kwargs.get('norm_cfg', {}).get('eps', 1e-6))

    @property
    def out_channels(self) -> list:
        """Channels of each output map, e.g. ``[D/4, D/2, D, D]``."""
        return list(self.pyramid.out_channels)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Feature maps of images ``x`` of shape (B, 3, H, W).

        Returns:
            tuple[Tensor]: One map per scale ``s``, of shape
            (B, C_s, s * H / p, s * W / p) for patch size ``p``.
        """
        return self.pyramid(super().forward(x))
