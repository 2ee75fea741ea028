"""MoE backbones and necks for MMDetection 3.3 and MMSegmentation 1.2.

Importing it (``import moe_plugin`` does) registers ``VisionMoE``,
``VisionMoEPyramid``, ``ConvNeXtMoE``, ``MoENeck`` and the MoE layers into
the ``MODELS`` registries of ``mmdet`` and ``mmseg`` where those import.
``moe_plugin.det`` / ``moe_plugin.seg`` do the same and raise a clear
``ImportError`` when the toolbox or mmcv's compiled ops are missing.
"""
from .registration import (UNAVAILABLE, in_pretrain_scope,
                           register_dense_models, require)
from .simple_pyramid import VITDET_SCALES, SimpleFeaturePyramid
from .vision_moe_pyramid import VisionMoEPyramid

register_dense_models()

__all__ = [
    'VisionMoEPyramid', 'SimpleFeaturePyramid', 'VITDET_SCALES',
    'register_dense_models', 'require', 'in_pretrain_scope', 'UNAVAILABLE'
]
