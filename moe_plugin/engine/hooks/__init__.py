from .expert_parallel_hook import ExpertParallelHook
from .random_state_hook import RandomStateHook
from .routing_logger_hook import (MoERoutingLoggerHook,
                                  OptionalTensorboardVisBackend)

__all__ = [
    'ExpertParallelHook', 'RandomStateHook', 'MoERoutingLoggerHook',
    'OptionalTensorboardVisBackend'
]
