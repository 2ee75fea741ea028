# V-MoE S/32 (last-2, 8 experts, top-2) fine-tuned on ImageNet-1k at 384 px
# with capacity factor 1.5 (V-MoE's ..._randaug_light1_ft_ilsvrc2012).
#
#   tools/dist_train.sh configs/vmoe/vmoe-s32-last2_8xb128_in1k-384px.py 8
#
# Expected: 75.9 % top-1 on ImageNet val (V-MoE's reported figure).
# Starts from the 224 px upstream weights in `load_from`: a weights-only
# file (see weights/README.md), e.g. converted from V-MoE's release or
# taken from configs/vmoe/vmoe-s32-last2_8xb1024_in1k.py's last checkpoint.
# The position embeddings (7x7 -> 12x12 patches) are resized on load by
# MMPretrain's VisionTransformer load hook. Total batch 1024 = 8 x 128.
_base_ = [
    '../_base_/models/vmoe-s32-last2.py',
    '../_base_/datasets/imagenet_bs64_384px.py',
    '../_base_/schedules/vmoe_ft_sgd_cosine_10k.py',
    '../_base_/default_runtime.py',
]

model = dict(
    backbone=dict(
        img_size=384,
        moe_cfg=dict(capacity_factor=1.5, eval_capacity_factor=1.5)),
    train_cfg=None)

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False))
log_processor = dict(by_epoch=False)

load_from = 'weights/vmoe-s32-last2_in1k.pth'
