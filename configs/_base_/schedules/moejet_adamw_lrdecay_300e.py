# MoE Jetpack's schedule: AdamW lr 4e-3 (total batch 4096), weight decay 0.05
# (none on norms, biases, position embedding, class token and the SpheroMoE
# temperatures), layer-wise lr decay 0.6 with the soft-routing parameters
# (slots, temperatures, slot norms) at the top depth (VisionMoE's
# get_layer_depth), gradient clipping 5, 20 warm-up epochs then cosine to
# 1 % of the lr at 300 epochs, mixed precision.
# fused=True: torch's one-kernel AdamW (CPU and CUDA; the same weights as
# the default to float round-off, tests/test_fused_adamw.py), ~7x faster than
# its default for-loop on a CPU for many-expert models.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(
        type='AdamW', lr=4e-3, weight_decay=0.05, eps=1e-8,
        betas=(0.9, 0.999), fused=True),
    constructor='LearningRateDecayOptimWrapperConstructor',
    paramwise_cfg=dict(
        layer_decay_rate=0.6,
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={
            '.cls_token': dict(decay_mult=0.0),
            '.pos_embed': dict(decay_mult=0.0),
            '.ffn.scales': dict(decay_mult=0.0),
            '.ffn.scale': dict(decay_mult=0.0),
        }),
    clip_grad=dict(max_norm=5.0),
)

param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        end=20,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        T_max=280,
        eta_min_ratio=1e-2,
        by_epoch=True,
        begin=20,
        end=300,
        convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=10)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=4096)
