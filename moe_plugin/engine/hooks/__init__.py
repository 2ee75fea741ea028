from .expert_parallel_hook import ExpertParallelHook
from .moe_aux_loss_hook import MoEAuxLossHook, add_moe_aux_loss
from .portable_checkpoint_hook import PortableCheckpointHook
from .random_state_hook import RandomStateHook
from .routing_logger_hook import MoERoutingLoggerHook

__all__ = [
    'ExpertParallelHook', 'PortableCheckpointHook', 'RandomStateHook',
    'MoERoutingLoggerHook', 'MoEAuxLossHook', 'add_moe_aux_loss'
]
