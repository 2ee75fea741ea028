# V-MoE S/32 upstream schedule on ImageNet-1k: Adam with decoupled weight
# decay 0.1 on the kernels only (no decay on biases, norms, class token and
# position embedding), lr 3e-3 for a total batch of 8192, 10k warm-up
# iterations (= 64 epochs at batch 8192) then linear decay to 1e-5 at 300
# epochs, gradient clipping at global norm 1.0.
# fused=True: torch's one-kernel AdamW (CPU and CUDA; the same weights as
# the default to float round-off, tests/test_fused_adamw.py), ~7x faster than
# its default for-loop on a CPU for many-expert models.
optim_wrapper = dict(
    optimizer=dict(
        type='AdamW', lr=3e-3, betas=(0.9, 0.999), weight_decay=0.1,
        fused=True),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={
            '.cls_token': dict(decay_mult=0.0),
            '.pos_embed': dict(decay_mult=0.0),
        }),
    clip_grad=dict(max_norm=1.0),
)

# Epoch boundaries converted to iterations, so the schedule follows the
# batch size actually used.
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-4,
        by_epoch=True,
        begin=0,
        end=64,
        convert_to_iter_based=True),
    dict(
        type='LinearLR',
        start_factor=1.0,
        end_factor=1e-5 / 3e-3,
        by_epoch=True,
        begin=64,
        end=300,
        convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=10)
val_cfg = dict()
test_cfg = dict()

# The lr above is for a total batch of 8192; `--auto-scale-lr` rescales it
# linearly for another total batch.
auto_scale_lr = dict(base_batch_size=8192)
