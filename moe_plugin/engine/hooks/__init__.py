from .expert_parallel_hook import ExpertParallelHook
from .moe_aux_loss_hook import MoEAuxLossHook, add_moe_aux_loss
from .random_state_hook import RandomStateHook
from .routing_logger_hook import (MoERoutingLoggerHook,
                                  OptionalTensorboardVisBackend)

__all__ = [
    'ExpertParallelHook', 'RandomStateHook', 'MoERoutingLoggerHook',
    'OptionalTensorboardVisBackend', 'MoEAuxLossHook', 'add_moe_aux_loss'
]
