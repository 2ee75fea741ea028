from .random_state_hook import RandomStateHook
from .routing_logger_hook import (MoERoutingLoggerHook,
                                  OptionalTensorboardVisBackend)

__all__ = [
    'RandomStateHook', 'MoERoutingLoggerHook', 'OptionalTensorboardVisBackend'
]
