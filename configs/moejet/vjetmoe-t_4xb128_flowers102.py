# MoE Jetpack's V-JetMoE-T (dual-path SpheroMoE, 98 + 196 experts in
# blocks 6..11) trained on Flowers-102 from recycled weights (ImageNet-21k
# ViT-T trunk, experts from an ImageNet-21k ViT-S in MoE Jetpack's transfer
# table; `load_from` is written by the recycling tool, see the ImageNet
# config vjetmoe-t_4xb256_in1k.py for how and its limits).
#
#   tools/dist_train.sh configs/moejet/vjetmoe-t_4xb128_flowers102.py 4
#
# Expected: 95.4 % top-1 on the Flowers-102 test split (MoE Jetpack's
# figure; dense ViT-T 62.4, dense from ImageNet-21k 81.9, Soft
# MoE from scratch 70.8).
_base_ = [
    '../_base_/models/moejet-vit-t-dual.py',
    '../_base_/datasets/moejet_downstream_224.py',
    '../_base_/schedules/moejet_downstream_100e.py',
    '../_base_/default_runtime.py',
]

model = dict(head=dict(num_classes=102, topk=(1, )))
data_preprocessor = dict(num_classes=102)
train_dataloader = dict(
    dataset=dict(
        type='Flowers102',
        data_root='data/flowers102',
        split='trainval'))
val_dataloader = dict(
    dataset=dict(
        type='Flowers102',
        data_root='data/flowers102',
        split='test'))
test_dataloader = val_dataloader

load_from = 'weights/vjetmoe-t_recycled.pth'
