from .expert_parallel_hook import ExpertParallelHook
from .portable_checkpoint_hook import PortableCheckpointHook
from .random_state_hook import RandomStateHook
from .routing_logger_hook import MoERoutingLoggerHook

__all__ = [
    'ExpertParallelHook', 'PortableCheckpointHook', 'RandomStateHook',
    'MoERoutingLoggerHook'
]
