# C-JetMoE-F of MoE Jetpack (arXiv 2406.04801): a ConvNeXt-F (depths 3, 3, 9,
# 3, channels 48, 96, 192, 384) whose blocks 10..18 (1-based, over all 18)
# use dual-path SpheroMoE as their pointwise MLP: stage 3 blocks 3..8 with
# 98 core + 196 universal experts (14x14 = 196 tokens), stage 4 with 24 + 48
# (7x7 = 49 tokens), one slot each. Recipe of the paper's ViT-T model.
# The paper gives no channel widths; those above are ConvNeXt-T's halved,
# as ViT-T halves ViT-S, the model MoE Jetpack recycles its experts from.
#
#   tools/dist_train.sh configs/convnext_moe/c-jetmoe-f_4xb256-accum4_in1k.py 4
#
# Expected: 80.5 % top-1 on ImageNet val (paper, experts recycled from
# ConvNeXt-T-21k; the dense ConvNeXt-F reaches 76.1 %).
# Edit only `num_gpus` (the N above) and `batch_per_gpu`; the gradient
# accumulation keeps the total batch at 4096.
_base_ = [
    '../_base_/datasets/imagenet_bs64_swin_224.py',
    '../_base_/schedules/convnext_jetmoe_adamw_cosine_300e.py',
    '../_base_/default_runtime.py',
]

num_gpus = 4
batch_per_gpu = 256
total_batch = 4096

sphero = dict(
    type='SpheroMoE',
    univ_factor=0.25,
    slots_per_expert=1,
    expert_drop=0.4)

model = dict(
    type='MoEImageClassifier',
    backbone=dict(
        type='ConvNeXtMoE',
        arch=dict(depths=[3, 3, 9, 3], channels=[48, 96, 192, 384]),
        img_size=224,
        drop_path_rate=0.1,
        moe_blocks=[[], [], [3, 4, 5, 6, 7, 8], 'all'],
        moe_cfg=[
            None, None,
            dict(sphero, num_experts=98, num_universal_experts=196),
            dict(sphero, num_experts=24, num_universal_experts=48),
        ]),
    neck=None,
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=384,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1,
                  mode='original'),
        init_cfg=None),
    init_cfg=dict(
        type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.),
    train_cfg=dict(augments=[
        dict(type='Mixup', alpha=0.8),
        dict(type='CutMix', alpha=1.0),
    ]),
)

train_dataloader = dict(batch_size=batch_per_gpu)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader
optim_wrapper = dict(
    accumulative_counts=total_batch // (num_gpus * batch_per_gpu))
auto_scale_lr = dict(base_batch_size=total_batch)
