# Dense-prediction demo, detection, dense backbone: Mask R-CNN with a tiny
# plain ViT (4 blocks of 64 dims, patch 8) and ViTDet's simple feature
# pyramid (strides 2, 4, 8, 16 on 96 px canvases) on digits pasted on a
# canvas (moe_plugin.datasets.prepare_digit_canvas). The backbone starts
# from the dense digits classifier of vit-p8_2xb64_digits.py through
# RecycleDenseInit (no MoE block: a plain copy, pos_embed resized).
#
#   tools/dist_train.sh \
#       configs/demo/dense/mask-rcnn_vit-pyramid_2xb4_digit-canvas.py 2 \
#       --cfg-options model.backbone.init_cfg.checkpoint=DENSE.pth
#
# Expected: none published; tools/demo/dense_prediction_demo.py records
# bbox_mAP in summary.json.
_base_ = [
    '../../det/_base_/models/mask-rcnn_r50_fpn.py',
    '../../det/_base_/default_runtime.py',
]
custom_imports = dict(imports=['moe_plugin.det'], allow_failed_imports=False)

data_root = 'data/digit_canvas/'
classes = tuple(str(i) for i in range(10))
model = dict(
    data_preprocessor=dict(
        mean=[127.5] * 3, std=[127.5] * 3, bgr_to_rgb=True,
        pad_size_divisor=32),
    backbone=dict(
        _delete_=True,
        type='VisionMoEPyramid',
        arch=dict(embed_dims=64, num_layers=4, num_heads=4,
                  feedforward_channels=128),
        img_size=96,
        patch_size=8,
        moe_layers=[],
        act='gelu_tanh',
        init_cfg=dict(type='RecycleDenseInit',
                      checkpoint='work_dirs/dense_demo/pretrain/dense.pth')),
    neck=dict(in_channels=[16, 32, 64, 64], out_channels=64, num_outs=5),
    rpn_head=dict(
        in_channels=64, feat_channels=64,
        anchor_generator=dict(scales=[8], strides=[2, 4, 8, 16, 32])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64,
                                featmap_strides=[2, 4, 8, 16]),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=10),
        mask_roi_extractor=dict(out_channels=64,
                                featmap_strides=[2, 4, 8, 16]),
        mask_head=dict(in_channels=64, conv_out_channels=64,
                       num_classes=10)))

# The canvases are already 96 px; Resize records the scale factor.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(96, 96), keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(96, 96), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor')),
]
dataset = dict(type='CocoDataset', data_root=data_root,
               metainfo=dict(classes=classes))
# tools/train.py defaults to MMPretrain's default_collate; detection
# batches are lists.
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    collate_fn=dict(type='pseudo_collate'),
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(**dataset, ann_file='annotations/train.json',
                 data_prefix=dict(img='images/train/'),
                 filter_cfg=dict(filter_empty_gt=True, min_size=4),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    collate_fn=dict(type='pseudo_collate'),
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(**dataset, ann_file='annotations/val.json',
                 data_prefix=dict(img='images/val/'), test_mode=True,
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric',
                     ann_file=data_root + 'annotations/val.json',
                     metric=['bbox', 'segm'], format_only=False)
test_evaluator = val_evaluator

max_epochs = 5
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs,
                 val_interval=max_epochs)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=50),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs,
                    max_keep_ckpts=1))
randomness = dict(seed=0)
