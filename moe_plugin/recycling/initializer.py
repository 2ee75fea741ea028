"""Config-only recycling: a registered weight initializer.

``init_cfg=dict(type='RecycleDenseInit', checkpoint='vit.pth')`` on a
``VisionMoE`` (or ``ConvNeXtMoE``, with a dense ConvNeXt checkpoint)
backbone upcycles the dense checkpoint when the model's weights are
initialised (``runner.train()`` or ``model.init_weights()``), for users who
would rather edit a config than run the tool.
"""
from typing import Optional

from mmengine.logging import print_log
from mmengine.registry import WEIGHT_INITIALIZERS
from torch import nn

from .formats import load_dense_vit
from .methods import CALIBRATED, METHODS
from .recycle import recycle_backbone


@WEIGHT_INITIALIZERS.register_module()
class RecycleDenseInit:
    """Initialise a ``VisionMoE`` backbone from a dense ViT checkpoint, or a
    ``ConvNeXtMoE`` from a dense ConvNeXt one.

    Args:
        checkpoint (str): dense timm / big_vision / MMPretrain checkpoint.
        method (str): 'upcycle', 'random' or 'uniform' (the methods that
            need no calibration). Defaults to 'upcycle'.
        dense_format (str, optional): force the checkpoint format.
            Defaults to None (detected).
        noise (float): std of noise on upcycled expert kernels.
            Defaults to 0.
        seed (int): sampling seed. Defaults to 0.
        dense_heads (int, optional): attention heads of a checkpoint wider
            than the model (narrowed by channel selection, ranked by its
            LayerNorm gains) when the file does not store them. Defaults to
            None (its width over the model's head width).
    """

    def __init__(self,
                 checkpoint: str,
                 method: str = 'upcycle',
                 dense_format: Optional[str] = None,
                 noise: float = 0.0,
                 seed: int = 0,
                 dense_heads: Optional[int] = None,
                 **kwargs):
        if kwargs:
            raise ValueError(
                f'RecycleDenseInit got unknown keys {sorted(kwargs)}; valid: '
                "['checkpoint', 'method', 'dense_format', 'noise', 'seed', "
                "'dense_heads']")
        if method in CALIBRATED:
            raise ValueError(
                f"method {method!r} needs calibration images: run "
                'tools/gen_weight/gen_vit_moe_weight.py and give its output '
                'to `load_from`')
        if method not in METHODS:
            raise ValueError(f'unknown method {method!r}; valid: {METHODS}')
        self.checkpoint = checkpoint
        self.method = method
        self.dense_format = dense_format
        self.noise = noise
        self.seed = seed
        self.dense_heads = dense_heads

    def __call__(self, module: nn.Module) -> None:
        if hasattr(module, 'moe_blocks'):  # ConvNeXtMoE
            from .convnext import load_dense_convnext, recycle_convnext
            dense = load_dense_convnext(self.checkpoint, self.dense_format)
            state, _ = recycle_convnext(dense, module, self.method,
                                        noise=self.noise, seed=self.seed)
            module.load_state_dict(state, strict=True)
            return
        dense = load_dense_vit(self.checkpoint, self.dense_format)
        state, _ = recycle_backbone(
            dense, module, self.method, noise=self.noise, seed=self.seed,
            dense_heads=self.dense_heads)
        module.load_state_dict(state, strict=True)
        print_log(
            f'RecycleDenseInit: {type(module).__name__} initialised from '
            f'{self.checkpoint} ({dense.fmt}, {dense.num_layers} blocks, '
            f'width {dense.embed_dims}) by {self.method!r}'
            f'{f" (noise {self.noise})" if self.noise else ""}',
            logger='current')

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(checkpoint={self.checkpoint!r}, '
                f'method={self.method!r})')
