"""Registered MMPretrain wrappers around :mod:`moe_plugin.layers`.

Importing this package registers the MoE layers, ``VisionMoE`` and
``MoEImageClassifier`` into MMPretrain's ``MODELS`` registry.
"""
from .backbones import ConvNeXtMoE, VisionMoE, parse_moe_layers
from .builder import build_moe_layer, register_moe_layers
from .classifiers import MoEImageClassifier
from .dense import VisionMoEPyramid
from .necks import MoENeck

__all__ = [
    'VisionMoE', 'parse_moe_layers', 'build_moe_layer', 'register_moe_layers',
    'MoEImageClassifier', 'MoENeck', 'ConvNeXtMoE', 'VisionMoEPyramid'
]
