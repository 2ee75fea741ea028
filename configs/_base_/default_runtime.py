# Runtime shared by every config (adapted from MMPretrain 1.2.0's
# configs/_base_/default_runtime.py).
default_scope = 'mmpretrain'

# Registers moe_plugin's models; tools/train.py and tools/test.py also import
# it, this makes the configs usable from MMPretrain's own tools.
custom_imports = dict(imports=['moe_plugin'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='VisualizationHook', enable=False),
    # Random states in every checkpoint: a resumed run draws the same router
    # noise, dropout and augmentation as an uninterrupted one.
    rng_state=dict(type='RandomStateHook'),
    # Run checkpoints that load with plain torch.load(weights_only=True),
    # so MMPretrain's inferencer, get_model and tools/test.py read them.
    portable=dict(type='PortableCheckpointHook'),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # Used on GPUs; on CPU tools/train.py starts a gloo group itself.
    dist_cfg=dict(backend='nccl'),
)

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='UniversalVisualizer', vis_backends=vis_backends)

log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
