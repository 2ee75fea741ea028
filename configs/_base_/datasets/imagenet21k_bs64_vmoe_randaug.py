# ImageNet-21k (21,843 classes, as V-MoE) at 224 px with the augmentation of
# imagenet_bs64_vmoe_randaug.py: Inception crop, flip, RandAugment with 2 ops
# at the strongest level; pixels scaled to [-1, 1]. (V-MoE's "strong"
# RandAugment magnitude 20 lies past the top of the 0..10 scale; MMPretrain
# clips magnitudes to `total_level`, so the top level is what it can
# express.) MMPretrain's ImageNet21k reads data/imagenet21k/train/<class>/*.jpg
# with meta/train.txt; it has no validation split, so hold out your own
# (e.g. 10k images) in meta/val.txt.
_base_ = ['./imagenet_bs64_vmoe_randaug.py']

dataset_type = 'ImageNet21k'
data_preprocessor = dict(num_classes=21843)

train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root='data/imagenet21k',
        ann_file='meta/train.txt',
        data_prefix='train',
        pipeline={{_base_.train_pipeline}}))

val_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root='data/imagenet21k',
        ann_file='meta/val.txt',
        data_prefix='train',
        pipeline={{_base_.test_pipeline}}))

test_dataloader = val_dataloader
