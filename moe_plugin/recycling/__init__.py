"""Dense ViT checkpoints into expert-initialised MoE weights.

Pure functions, no runner: read a dense checkpoint into a canonical form
(:mod:`.formats`), choose each expert's hidden neurons (:mod:`.methods`),
optionally from activation statistics of calibration images
(:mod:`.calibration`), and build the MoE state dict with a report
(:mod:`.recycle`). ``tools/gen_weight/gen_vit_moe_weight.py`` is the CLI;
:class:`.initializer.RecycleDenseInit` the config-only route.
"""
from .calibration import balanced_choice, build_dense_vit, calibrate
from .convnext import (DenseConvNeXt, load_dense_convnext, recycle_convnext,
                       recycle_convnext_model)
from .formats import DenseViT, load_dense_vit, sha256
from .initializer import RecycleDenseInit
from .methods import (CALIBRATED, METHODS, RecyclingOptions, build_experts,
                      select_indices)
from .recycle import check_sources, recycle, recycle_backbone, save_recycled

__all__ = [
    'DenseViT', 'load_dense_vit', 'sha256', 'METHODS', 'CALIBRATED',
    'RecyclingOptions', 'check_sources', 'select_indices', 'build_experts',
    'calibrate', 'balanced_choice', 'build_dense_vit', 'recycle',
    'recycle_backbone', 'save_recycled', 'RecycleDenseInit', 'DenseConvNeXt',
    'load_dense_convnext', 'recycle_convnext', 'recycle_convnext_model'
]
