"""Registered MMPretrain wrappers around :mod:`moe_plugin.layers`.

Importing this package registers the MoE layers, ``VisionMoE`` and
``MoEImageClassifier`` into MMPretrain's ``MODELS`` registry.
"""
from .backbones import VisionMoE, parse_moe_layers
from .builder import build_moe_layer, register_moe_layers
from .classifiers import MoEImageClassifier

__all__ = [
    'VisionMoE', 'parse_moe_layers', 'build_moe_layer', 'register_moe_layers',
    'MoEImageClassifier'
]
