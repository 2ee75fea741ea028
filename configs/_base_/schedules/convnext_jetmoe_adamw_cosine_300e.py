# MoE Jetpack's ImageNet-1k schedule (spec 02): AdamW lr 4e-3 at batch 4096,
# wd 0.05, layer-wise lr decay 0.6, grad clip 5, 20 warm-up epochs, then
# cosine to 1 % of the lr, 300 epochs, AMP.
# fused=True: torch's one-kernel AdamW (CPU and CUDA; the same weights as
# the default to float round-off, tests/test_fused_adamw.py), ~7x faster than
# its default for-loop on a CPU for many-expert models.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=4e-3, weight_decay=0.05,
                   betas=(0.9, 0.999), fused=True),
    constructor='LearningRateDecayOptimWrapperConstructor',
    paramwise_cfg=dict(
        layer_decay_rate=0.6,
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0),
    clip_grad=dict(max_norm=5.0),
)

max_epochs = 300
warmup_epochs = 20
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        begin=0,
        end=warmup_epochs,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        T_max=max_epochs - warmup_epochs,
        eta_min_ratio=0.01,
        by_epoch=True,
        begin=warmup_epochs,
        end=max_epochs,
        convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=10)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=4096)
