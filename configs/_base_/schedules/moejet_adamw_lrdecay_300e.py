# MoE Jetpack's schedule: AdamW lr 4e-3 (total batch 4096), weight decay 0.05
# (none on norms, biases, position embedding, class token and the SpheroMoE
# temperatures), layer-wise lr decay 0.6 with the soft-routing parameters
# (slots, temperatures, slot norms) at the top depth (VisionMoE's
# get_layer_depth), gradient clipping 5, 20 warm-up epochs then cosine to
# 1 % of the lr at 300 epochs, mixed precision.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(
        type='AdamW', lr=4e-3, weight_decay=0.05, eps=1e-8,
        betas=(0.9, 0.999)),
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
