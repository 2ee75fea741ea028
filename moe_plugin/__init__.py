"""moe_plugin: Mixture-of-Experts Vision Transformers for MMPretrain.

Importing the package registers every model into MMPretrain's registries.
"""
from . import datasets, engine, layers, models, recycling  # noqa: F401

__version__ = '0.1.0'
