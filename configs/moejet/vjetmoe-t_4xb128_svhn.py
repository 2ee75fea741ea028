# MoE Jetpack's V-JetMoE-T (dual-path SpheroMoE, 98 + 196 experts in
# blocks 6..11) trained on SVHN from recycled weights (ImageNet-21k
# ViT-T trunk, experts from an ImageNet-21k ViT-S in MoE Jetpack's transfer
# table; `load_from` is written by the recycling tool, see the ImageNet
# config vjetmoe-t_4xb256_in1k.py for how and its limits).
# SVHN has no MMPretrain dataset class: export it as an image folder,
# data/svhn/{train,test}/<class>/<image>.png (CustomDataset).
#
#   tools/dist_train.sh configs/moejet/vjetmoe-t_4xb128_svhn.py 4
#
# Expected: no published figure (SVHN is in MoE Jetpack's dataset
# configs, not in its results table).
_base_ = [
    '../_base_/models/moejet-vit-t-dual.py',
    '../_base_/datasets/moejet_downstream_224.py',
    '../_base_/schedules/moejet_downstream_100e.py',
    '../_base_/default_runtime.py',
]

model = dict(head=dict(num_classes=10, topk=(1, )))
data_preprocessor = dict(num_classes=10)
train_dataloader = dict(
    dataset=dict(
        type='CustomDataset',
        data_root='data/svhn',
        data_prefix='train'))
val_dataloader = dict(
    dataset=dict(
        type='CustomDataset',
        data_root='data/svhn',
        data_prefix='test'))
test_dataloader = val_dataloader

load_from = 'weights/vjetmoe-t_recycled.pth'
