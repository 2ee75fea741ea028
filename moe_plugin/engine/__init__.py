"""Registered MMEngine hooks and optimizer constructors of moe_plugin."""
from .hooks import (MoERoutingLoggerHook, OptionalTensorboardVisBackend,
                    RandomStateHook)

__all__ = [
    'RandomStateHook', 'MoERoutingLoggerHook', 'OptionalTensorboardVisBackend'
]
