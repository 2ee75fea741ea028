# V-MoE B/16 (every-2, 8 experts, top-2) pre-trained on ImageNet-21k and
# fine-tuned on ImageNet-1k at 384 px with capacity factor 1.5 (V-MoE's
# vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012).
#
#   tools/dist_train.sh configs/vmoe/vmoe-b16-every2_8xb128_in1k-384px.py 8
#
# Expected: 85.6 % top-1 on ImageNet val (V-MoE's reported figure).
# Starts from the ImageNet-21k weights in `load_from` (weights-only file,
# see weights/README.md); the 21k classifier and its pre-logits layer are
# replaced by a new zero-initialised 1000-class head (their weights are
# skipped on load), and the position embeddings (14x14 -> 24x24 patches)
# are resized on load. Total batch 1024 = 8 x 128.
_base_ = [
    '../_base_/models/vmoe-b16-every2.py',
    '../_base_/datasets/imagenet_bs64_384px.py',
    '../_base_/schedules/vmoe_ft_sgd_cosine_10k.py',
    '../_base_/default_runtime.py',
]

model = dict(
    backbone=dict(
        img_size=384,
        moe_cfg=dict(capacity_factor=1.5, eval_capacity_factor=1.5)),
    head=dict(
        num_classes=1000,
        hidden_dim=None,
        init_cfg=dict(
            type='Constant', layer='Linear', val=0, bias=-6.9078)),
    train_cfg=None)

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False))
log_processor = dict(by_epoch=False)

load_from = 'weights/vmoe-b16-every2_in21k.pth'
