# Mask R-CNN with a ViTDet-style V-MoE-B/16 backbone on COCO: the plain
# ViT-B/16 with sparse MoE FFNs in every other block (8 experts, top-2,
# upcycled from a dense ViT-B/16 classification checkpoint through
# RecycleDenseInit), ViTDet's simple feature pyramid (strides 4-32) into
# MMDetection's FPN, and ViTDet's recipe: 1024 px large-scale jitter, AdamW
# (lr 1e-4, weight decay 0.1), drop path 0.1, 100 epochs at batch 64.
# Global attention in every block (no windows, no relative positions) and
# MMDetection's standard Mask R-CNN heads, so that the dense checkpoint's
# blocks load unchanged. ViTDet's layer-wise lr decay (0.7) is not applied:
# MMDetection 3.3 has no layer-decay constructor for a ViT backbone.
#
#   tools/dist_train.sh configs/det/mask-rcnn_vmoe-b16-sfp_8xb8-100e_coco.py 8
#   (dense checkpoint: --cfg-options model.backbone.init_cfg.checkpoint=X)
#
# Expected: none published for an MoE backbone. For scale: ViTDet-B (MAE
# pre-training, windowed attention, 4conv1fc heads) reports 51.6 box AP /
# 45.9 mask AP on COCO val2017.
_base_ = [
    './_base_/models/mask-rcnn_r50_fpn.py',
    './_base_/datasets/coco_instance.py',
    './_base_/default_runtime.py',
]
custom_imports = dict(imports=['moe_plugin.det'], allow_failed_imports=False)

image_size = (1024, 1024)
model = dict(
    data_preprocessor=dict(pad_size_divisor=32, batch_augments=[
        dict(type='BatchFixedSizePad', size=image_size, pad_mask=True)
    ]),
    backbone=dict(
        _delete_=True,
        type='VisionMoEPyramid',
        arch='vmoe-b',
        img_size=1024,
        patch_size=16,
        act='gelu',
        drop_path_rate=0.1,
        moe_layers='every-2',
        moe_cfg=dict(type='SparseMoE', num_experts=8, top_k=2,
                     capacity_factor=1.05, eval_capacity_factor=2.0),
        init_cfg=dict(type='RecycleDenseInit',
                      checkpoint='weights/vit-b16_in21k.pth')),
    neck=dict(in_channels=[192, 384, 768, 768], out_channels=256,
              num_outs=5))
custom_hooks = [dict(type='MoEAuxLossHook')]

# Large-scale jitter (ViTDet).
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomResize', scale=image_size, ratio_range=(0.1, 2.0),
         keep_ratio=True),
    dict(type='RandomCrop', crop_type='absolute_range', crop_size=image_size,
         recompute_bbox=True, allow_negative_crop=True),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor')),
]
# tools/train.py defaults to MMPretrain's default_collate.
train_dataloader = dict(batch_size=8, num_workers=8,
                        collate_fn=dict(type='pseudo_collate'),
                        dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(collate_fn=dict(type='pseudo_collate'),
                      dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

max_epochs = 100
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs,
                 val_interval=10)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=0.1),
    paramwise_cfg=dict(custom_keys={
        'pos_embed': dict(decay_mult=0.),
        'cls_token': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
        'router': dict(decay_mult=0.),
    }),
    clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=250),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[88, 96], gamma=0.1),
]
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=10,
                                     max_keep_ckpts=3))
auto_scale_lr = dict(base_batch_size=64)
