# ViT's ImageNet-21k upstream schedule (Dosovitskiy et al., table 3): Adam
# with decoupled weight decay 0.03 (kernels only), lr 1e-3 for a total batch
# of 4096, 10k warm-up iterations (~3 epochs of ImageNet-21k at batch 4096)
# then linear decay to 1e-5 at 90 epochs, gradient clipping at 1.0.
# fused=True: torch's one-kernel AdamW (CPU and CUDA; the same weights as
# the default to float round-off, tests/test_fused_adamw.py), ~7x faster than
# its default for-loop on a CPU for many-expert models.
optim_wrapper = dict(
    optimizer=dict(
        type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.03,
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

param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-4,
        by_epoch=True,
        begin=0,
        end=3,
        convert_to_iter_based=True),
    dict(
        type='LinearLR',
        start_factor=1.0,
        end_factor=1e-5 / 1e-3,
        by_epoch=True,
        begin=3,
        end=90,
        convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=90, val_interval=5)
val_cfg = dict()
test_cfg = dict()

auto_scale_lr = dict(base_batch_size=4096)
