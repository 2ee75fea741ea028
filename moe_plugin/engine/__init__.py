"""Registered MMEngine hooks, model wrappers and optimizer constructors of
moe_plugin."""
from .hooks import (ExpertParallelHook, MoEAuxLossHook, MoERoutingLoggerHook,
                    OptionalTensorboardVisBackend, RandomStateHook,
                    add_moe_aux_loss)
from .model_wrapper import (MoEDistributedDataParallel,
                            configure_expert_parallel)

__all__ = [
    'ExpertParallelHook', 'RandomStateHook', 'MoERoutingLoggerHook',
    'OptionalTensorboardVisBackend', 'MoEDistributedDataParallel',
    'configure_expert_parallel', 'MoEAuxLossHook', 'add_moe_aux_loss'
]
