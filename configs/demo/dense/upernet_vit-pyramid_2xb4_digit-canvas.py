# Dense-prediction demo, segmentation, dense backbone: UperNet with the
# tiny plain ViT + simple feature pyramid of the detection demo on the
# canvas label maps (11 classes: background and the digits). The backbone
# starts from the dense digits classifier (RecycleDenseInit).
#
#   tools/dist_train.sh \
#       configs/demo/dense/upernet_vit-pyramid_2xb4_digit-canvas.py 2 \
#       --cfg-options model.backbone.init_cfg.checkpoint=DENSE.pth
#
# Expected: none published; tools/demo/dense_prediction_demo.py records
# mIoU in summary.json.
_base_ = ['../../seg/_base_/default_runtime.py']
custom_imports = dict(imports=['moe_plugin.seg'], allow_failed_imports=False)

data_root = 'data/digit_canvas/'
classes = ('background', ) + tuple(str(i) for i in range(10))
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor', mean=[127.5] * 3, std=[127.5] * 3,
        bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(96, 96)),
    backbone=dict(
        type='VisionMoEPyramid',
        arch=dict(embed_dims=64, num_layers=4, num_heads=4,
                  feedforward_channels=128),
        img_size=96,
        patch_size=8,
        moe_layers=[],
        act='gelu_tanh',
        init_cfg=dict(type='RecycleDenseInit',
                      checkpoint='work_dirs/dense_demo/pretrain/dense.pth')),
    decode_head=dict(
        type='UPerHead', in_channels=[16, 32, 64, 64], in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6), channels=64, dropout_ratio=0.1,
        num_classes=len(classes), norm_cfg=norm_cfg, align_corners=False,
        # Background is ~94 % of the pixels: weighed down so that a few
        # epochs do not settle on "all background".
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                         loss_weight=1.0,
                         class_weight=[0.1] + [1.0] * (len(classes) - 1))),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
dataset = dict(type='BaseSegDataset', data_root=data_root,
               metainfo=dict(classes=classes), img_suffix='.png',
               seg_map_suffix='.png', pipeline=pipeline)
# tools/train.py defaults to MMPretrain's default_collate.
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    collate_fn=dict(type='pseudo_collate'),
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(**dataset, data_prefix=dict(
        img_path='images/train', seg_map_path='seg_maps/train')))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    collate_fn=dict(type='pseudo_collate'),
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(**dataset, data_prefix=dict(
        img_path='images/val', seg_map_path='seg_maps/val')))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs,
                 val_interval=max_epochs)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=50),
]
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=True),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=True,
                    interval=max_epochs, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
log_processor = dict(by_epoch=True)
randomness = dict(seed=0)
