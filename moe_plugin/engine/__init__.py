"""The MMEngine side of moe_plugin: what a run needs beyond the model.

- ``hooks/``: :class:`ExpertParallelHook` (full experts in the checkpoints
  of expert-parallel runs), :class:`RandomStateHook` (every rank's random
  generators in the checkpoints, so that a resumed run draws what an
  uninterrupted one does), :class:`PortableCheckpointHook` (run checkpoints
  that load with plain ``torch.load(weights_only=True)``),
  :class:`MoERoutingLoggerHook` (each MoE layer's routing as scalars),
  :class:`MoEAuxLossHook` / :func:`add_moe_aux_loss` (the routers'
  auxiliary losses added to an MMDetection / MMSegmentation model's losses);
  ``hooks/checkpoint_due.py`` tells the hooks when a checkpoint is due.
- :mod:`.model_wrapper`: :class:`MoEDistributedDataParallel` (DDP that
  leaves the sharded experts out) and :func:`configure_expert_parallel`
  (the config switch that picks it).
- :mod:`.vis_backends`: :class:`OptionalTensorboardVisBackend`.
- :mod:`.runner_setup`: the runner set-up that ``tools/train.py`` and
  ``tools/test.py`` share (:func:`build_runner`).

Everything registered here is found by its ``type=`` name in a config.
"""
from .hooks import (ExpertParallelHook, MoEAuxLossHook, MoERoutingLoggerHook,
                    PortableCheckpointHook, RandomStateHook, add_moe_aux_loss)
from .model_wrapper import (MoEDistributedDataParallel,
                            configure_expert_parallel)
from .runner_setup import build_runner
from .vis_backends import OptionalTensorboardVisBackend

__all__ = [
    'ExpertParallelHook', 'RandomStateHook', 'PortableCheckpointHook',
    'MoERoutingLoggerHook', 'OptionalTensorboardVisBackend',
    'MoEDistributedDataParallel', 'configure_expert_parallel', 'build_runner',
    'MoEAuxLossHook', 'add_moe_aux_loss'
]
