# MoE Jetpack's V-JetMoE-T (dual-path SpheroMoE, 98 + 196 experts in
# blocks 6..11) trained on CIFAR-100 from recycled weights (ImageNet-21k
# ViT-T trunk, experts from an ImageNet-21k ViT-S in MoE Jetpack's transfer
# table; `load_from` is written by the recycling tool, see the ImageNet
# config vjetmoe-t_4xb256_in1k.py for how and its limits).
#
#   tools/dist_train.sh configs/moejet/vjetmoe-t_4xb128_cifar100.py 4
#
# Expected: 88.4 % top-1 on the CIFAR-100 test split (MoE Jetpack's
# figure; dense ViT-T 72.3, dense from ImageNet-21k 81.4, Soft
# MoE from scratch 75.9).
_base_ = [
    '../_base_/models/moejet-vit-t-dual.py',
    '../_base_/datasets/moejet_downstream_224.py',
    '../_base_/schedules/moejet_downstream_100e.py',
    '../_base_/default_runtime.py',
]

model = dict(head=dict(num_classes=100, topk=(1, )))
# CIFAR's arrays are RGB and have their own statistics.
data_preprocessor = dict(
    num_classes=100,
    mean=[125.307, 122.961, 113.8575],
    std=[51.5865, 50.847, 51.255],
    to_rgb=False)
train_dataloader = dict(
    dataset=dict(
        type='CIFAR100',
        data_root='data/cifar100',
        split='train',
        pipeline={{_base_.cifar_train_pipeline}}))
val_dataloader = dict(
    dataset=dict(
        type='CIFAR100',
        data_root='data/cifar100',
        split='test',
        pipeline={{_base_.cifar_test_pipeline}}))
test_dataloader = val_dataloader

load_from = 'weights/vjetmoe-t_recycled.pth'
