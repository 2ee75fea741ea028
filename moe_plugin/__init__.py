"""moe_plugin: Mixture-of-Experts Vision Transformers for MMPretrain.

Importing the package registers every model into MMPretrain's registries.
"""
from .cli import silence_mmcv_lite

# Before MMPretrain imports mmcv: mmcv-lite warns that its compiled ops are
# missing, and the plugin uses none of them.
silence_mmcv_lite()

from . import datasets, engine, layers, models, recycling  # noqa: E402,F401

__version__ = '0.1.0'
