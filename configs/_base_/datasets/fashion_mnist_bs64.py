# Fashion-MNIST (28x28 grey, 10 classes) read by MMPretrain's FashionMNIST
# through moe_plugin's FashionMNISTSubset from the uncompressed IDX files in
# data/fashion_mnist, which `make fashion-mnist-data` (or the recycling
# benchmark itself) gunzips from /usr/share/datasets/fashion-mnist (Debian's
# dataset-fashion-mnist). Nothing is downloaded. A task sets `classes` (the
# original class indices, remapped to 0..k-1) and optionally `per_class`.
dataset_type = 'FashionMNISTSubset'
data_root = 'data/fashion_mnist'
data_preprocessor = dict(
    num_classes=10,
    mean=[72.94],  # Fashion-MNIST's training-set pixel mean and std
    std=[90.02],
    to_rgb=False,
)

# Clothes stay clothes when mirrored; a 2-pixel padded crop jitters them.
train_pipeline = [
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RandomCrop', crop_size=28, padding=2),
    dict(type='PackInputs'),
]

test_pipeline = [
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        split='train',
        classes=list(range(10)),
        pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)

val_dataloader = dict(
    batch_size=256,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        split='test',
        classes=list(range(10)),
        pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=(1, ))

test_dataloader = val_dataloader
test_evaluator = val_evaluator
