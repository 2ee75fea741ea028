# MoE Jetpack's V-JetMoE-T (dual-path SpheroMoE, 98 + 196 experts in
# blocks 6..11) trained on CIFAR-10 from recycled weights (ImageNet-21k
# ViT-T trunk, experts from an ImageNet-21k ViT-S in MoE Jetpack's transfer
# table; `load_from` is written by the recycling tool, see the ImageNet
# config vjetmoe-t_4xb256_in1k.py for how and its limits).
#
#   tools/dist_train.sh configs/moejet/vjetmoe-t_4xb128_cifar10.py 4
#
# Expected: 97.9 % top-1 on the CIFAR-10 test split (MoE Jetpack's
# figure; dense ViT-T 92.4, dense from ImageNet-21k 97.0, Soft
# MoE from scratch 92.9).
_base_ = [
    '../_base_/models/moejet-vit-t-dual.py',
    '../_base_/datasets/moejet_downstream_224.py',
    '../_base_/schedules/moejet_downstream_100e.py',
    '../_base_/default_runtime.py',
]

model = dict(head=dict(num_classes=10, topk=(1, )))
# CIFAR's arrays are RGB and have their own statistics.
data_preprocessor = dict(
    num_classes=10,
    mean=[125.307, 122.961, 113.8575],
    std=[51.5865, 50.847, 51.255],
    to_rgb=False)
train_dataloader = dict(
    dataset=dict(
        type='CIFAR10',
        data_root='data/cifar10',
        split='train',
        pipeline={{_base_.cifar_train_pipeline}}))
val_dataloader = dict(
    dataset=dict(
        type='CIFAR10',
        data_root='data/cifar10',
        split='test',
        pipeline={{_base_.cifar_test_pipeline}}))
test_dataloader = val_dataloader

load_from = 'weights/vjetmoe-t_recycled.pth'
