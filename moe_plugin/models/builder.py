"""Registration of the MoE layers and the ``moe_cfg`` → layer builder.

``moe_plugin.layers`` is pure PyTorch and knows no registry; this module puts
its MoE layer classes into MMPretrain's ``MODELS`` registry so that a config
picks one with ``moe_cfg=dict(type='SparseMoE', ...)``.
"""
import inspect
from typing import Optional

import torch.nn as nn
from mmpretrain.registry import MODELS

from moe_plugin import layers as moe_layers_lib
from moe_plugin.layers import MoELayer

#: Names of the layer classes of :mod:`moe_plugin.layers` that can replace a
#: ViT FFN: its :class:`~moe_plugin.layers.MoELayer` subclasses, registered
#: on import.
MOE_LAYER_TYPES = tuple(
    name for name in moe_layers_lib.__all__
    if inspect.isclass(getattr(moe_layers_lib, name))
    and issubclass(getattr(moe_layers_lib, name), MoELayer)
    and getattr(moe_layers_lib, name) is not MoELayer)


def register_moe_layers(registry=MODELS) -> list:
    """Register the MoE layer classes of :mod:`moe_plugin.layers`.

    Registering twice is a no-op for the same class; a different class
    already registered under the same name raises ``KeyError`` (the registry's
    ``force=False`` semantics).

    Args:
        registry (Registry): The registry to fill. Defaults to MMPretrain's
            ``MODELS``.

    Returns:
        list[str]: The names of the registered layer classes.
    """
    names = []
    for name in MOE_LAYER_TYPES:
        cls = getattr(moe_layers_lib, name)
        if registry.module_dict.get(name) is not cls:
            registry.register_module(module=cls, force=False)
        names.append(name)
    return names


def _accepts(cls: type, arg: str) -> bool:
    """Whether ``cls(...)`` takes the keyword ``arg``."""
    params = inspect.signature(cls.__init__).parameters
    return arg in params or any(p.kind == p.VAR_KEYWORD
                                for p in params.values())


def build_moe_layer(moe_cfg: dict,
                    embed_dims: int,
                    feedforward_channels: Optional[int] = None,
                    **defaults) -> nn.Module:
    """Build an MoE layer from its config.

    The config is copied; ``embed_dims`` and ``feedforward_channels`` are
    filled in unless the config gives them, and so is every entry of
    ``defaults`` (e.g. ``act`` of the backbone) that the layer's constructor
    accepts (a layer without an ``act`` argument is still buildable).

    Args:
        moe_cfg (dict): ``type`` (a registered layer name such as
            ``'SparseMoE'``, or a class) and the layer's keyword arguments.
        embed_dims (int): Token dimension ``D``.
        feedforward_channels (int, optional): Hidden width of each expert.
            Defaults to None (not filled in).
        **defaults: Further keyword arguments used when the config does not
            give them and the layer accepts them.

    Returns:
        nn.Module: The layer, ``forward(x: [B, N, D]) -> [B, N, D]`` without
        the residual.
    """
    if not isinstance(moe_cfg, dict):
        raise ValueError(
            f'`moe_cfg` must be a dict with a `type`, got {moe_cfg!r}')
    cfg = dict(moe_cfg)
    layer_type = cfg.get('type')
    if isinstance(layer_type, str):
        layer_cls = MODELS.get(layer_type)
    elif inspect.isclass(layer_type) and issubclass(layer_type, nn.Module):
        layer_cls = layer_type
    else:
        layer_cls = None
    if layer_cls is None:
        raise ValueError(
            f'`moe_cfg` needs a `type` naming a registered MoE layer '
            f'(one of {register_moe_layers()}), got type={layer_type!r}')
    cfg.setdefault('embed_dims', embed_dims)
    if feedforward_channels is not None:
        cfg.setdefault('feedforward_channels', feedforward_channels)
    for key, value in defaults.items():
        if key not in cfg and _accepts(layer_cls, key):
            cfg[key] = value
    cfg['type'] = layer_cls
    return MODELS.build(cfg)


register_moe_layers()
