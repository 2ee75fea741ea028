# ImageNet-21k (21,843 classes, as V-MoE) at 224 px: Inception crop, flip,
# RandAugment with 2 ops at the strongest level; pixels scaled to [-1, 1].
# (V-MoE's "strong" RandAugment magnitude 20 lies past the top of the
# 0..10 scale; MMPretrain clips magnitudes to `total_level`, so the top
# level is what it can express.) MMPretrain's ImageNet21k
# reads data/imagenet21k/train/<class>/*.jpg with meta/train.txt; it has no
# validation split, so hold out your own (e.g. 10k images) in meta/val.txt.
dataset_type = 'ImageNet21k'
data_preprocessor = dict(
    num_classes=21843,
    mean=[127.5, 127.5, 127.5],
    std=[127.5, 127.5, 127.5],
    to_rgb=True,
)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='RandomResizedCrop',
        scale=224,
        backend='pillow',
        interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(
        type='RandAugment',
        policies='timm_increasing',
        num_policies=2,
        total_level=10,
        magnitude_level=10,
        hparams=dict(pad_val=[128, 128, 128], interpolation='bicubic')),
    dict(type='PackInputs'),
]

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='ResizeEdge',
        scale=256,
        edge='short',
        backend='pillow',
        interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=64,
    num_workers=8,
    dataset=dict(
        type=dataset_type,
        data_root='data/imagenet21k',
        ann_file='meta/train.txt',
        data_prefix='train',
        pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)

val_dataloader = dict(
    batch_size=64,
    num_workers=8,
    dataset=dict(
        type=dataset_type,
        data_root='data/imagenet21k',
        ann_file='meta/val.txt',
        data_prefix='train',
        pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=(1, 5))

test_dataloader = val_dataloader
test_evaluator = val_evaluator
