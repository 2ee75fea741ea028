# The recycling benchmark on Fashion-MNIST (tools/demo/recycling_demo.py
# --dataset fashion_mnist, `make benchmark-recycling`), downstream step: a
# small V-MoE (4 blocks of 64 dims, MLP 128, patch 4 on 28x28 grey images:
# 49 tokens + class token; 4 experts, top-2, in blocks 1 and 3) fine-tuned
# on the downstream classes 5-9 (remapped to 0-4), 100 training images per
# class, evaluated on 2,000 test images after every epoch. The benchmark
# runs it from scratch (`scratch`) and from the dense upstream ViT upcycled
# by tools/gen_weight/gen_vit_moe_weight.py (`upcycle`, load_from=...).
# The benchmark sets the classes, images per class, epochs and seed with
# --cfg-options; every downstream run (this one, the SpheroMoE and the
# dense fine-tune) uses this recipe.
#
#   tools/dist_train.sh
#   configs/benchmark/recycling/vmoe_2xb64_fmnist-down.py 2
#
# Expected (3 seeds, docs/recycling_benchmark.md): from scratch 57.1 %
# top-1 after 16 epochs, upcycled 82.3 % (mean; std 2.1 and 3.2).
_base_ = [
    '../../_base_/datasets/fashion_mnist_bs64.py',
    '../../_base_/default_runtime.py',
]

num_classes = 5
model = dict(
    type='MoEImageClassifier',
    aux_loss_weights=dict(importance=0.005, load=0.005, gshard=0.0, z=0.0),
    backbone=dict(
        type='VisionMoE',
        arch=dict(
            embed_dims=64,
            num_layers=4,
            num_heads=4,
            feedforward_channels=128),
        img_size=28,
        patch_size=4,
        in_channels=1,
        moe_layers='every-2',
        out_type='cls_token',
        act='gelu_tanh',
        moe_cfg=dict(
            type='SparseMoE',
            num_experts=4,
            top_k=2,
            capacity_factor=1.05,
            eval_capacity_factor=2.0,
            group_size=None)),
    neck=None,
    head=dict(
        type='VisionTransformerClsHead',
        num_classes=num_classes,
        in_channels=64,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1),
    ))
data_preprocessor = dict(num_classes=num_classes)
train_dataloader = dict(
    dataset=dict(classes=[5, 6, 7, 8, 9], per_class=100, seed=0))
val_dataloader = dict(
    dataset=dict(classes=[5, 6, 7, 8, 9], per_class=400, seed=0))
test_dataloader = val_dataloader

optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={
            '.cls_token': dict(decay_mult=0.0),
            '.pos_embed': dict(decay_mult=0.0),
            '.ffn.scales': dict(decay_mult=0.0),
        }),
    clip_grad=dict(max_norm=1.0),
)

max_epochs = 16
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, eta_min=1e-5,
         by_epoch=True, begin=1, end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict()
test_cfg = dict()

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs,
                    max_keep_ckpts=1))
custom_hooks = [dict(type='MoERoutingLoggerHook', interval=10)]
randomness = dict(seed=0)
