# Soft MoE S/16: a ViT-S/16 (384 dims, 12 blocks, 6 heads, MLP 1536) whose
# last 6 blocks hold a Soft MoE with 128 experts of 1 slot each (Soft MoE's
# S/16 128E), multi-head attention pooling, trained on ImageNet-1k with the
# V-MoE upstream recipe (Adam, wd 0.1, warm-up then linear decay, RandAugment
# and mixup 0.2).
#
#   tools/dist_train.sh configs/soft_moe/softmoe-s16-128e_8xb512_in1k.py 8
#
# Expected: the paper's 86.8 % ImageNet top-1 (ViT S/16: 84.0) comes from
# pre-training on JFT-4B and fine-tuning; trained on ImageNet-1k alone no
# figure is published for this model.
_base_ = [
    '../_base_/datasets/imagenet_bs64_vmoe_randaug.py',
    '../_base_/schedules/vmoe_adamw_linear_300e.py',
    '../_base_/default_runtime.py',
]

model = dict(
    type='MoEImageClassifier',
    backbone=dict(
        type='VisionMoE',
        arch='deit-small',
        img_size=224,
        patch_size=16,
        act='gelu_tanh',
        out_type='map',
        with_cls_token=False,
        moe_layers='last-6-blocks',
        moe_cfg=dict(type='SoftMoE', num_experts=128, slots_per_expert=1)),
    neck=None,
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=384,
        loss=dict(type='CrossEntropyLoss', use_sigmoid=True),
        init_cfg=dict(type='Constant', layer='Linear', val=0, bias=-6.9078),
        topk=(1, 5)),
    train_cfg=dict(augments=dict(type='Mixup', alpha=0.2)),
)

train_dataloader = dict(batch_size=512)
val_dataloader = dict(batch_size=256)
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=3e-3 * 4096 / 8192))
auto_scale_lr = dict(base_batch_size=4096)
