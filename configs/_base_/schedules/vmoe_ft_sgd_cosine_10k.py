# V-MoE fine-tuning schedule: SGD with momentum 0.9 and no weight decay,
# lr 0.003 for a total batch of 1024, 500 warm-up iterations then cosine
# decay to 0 at 10k iterations, gradient clipping at global norm 10.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.003, momentum=0.9, weight_decay=0.0),
    clip_grad=dict(max_norm=10.0),
)

param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-4, by_epoch=False, begin=0,
        end=500),
    dict(
        type='CosineAnnealingLR',
        T_max=9500,
        eta_min=0.0,
        by_epoch=False,
        begin=500,
        end=10000),
]

# Iteration-based: pair with `log_processor = dict(by_epoch=False)` and an
# iteration-based CheckpointHook (see configs/vmoe/*-384px.py).
train_cfg = dict(by_epoch=False, max_iters=10000, val_interval=1000)
val_cfg = dict()
test_cfg = dict()

auto_scale_lr = dict(base_batch_size=1024)
