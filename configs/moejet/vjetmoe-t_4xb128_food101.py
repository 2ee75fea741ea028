# MoE Jetpack's V-JetMoE-T (dual-path SpheroMoE, 98 + 196 experts in
# blocks 6..11) trained on Food-101 from recycled weights (ImageNet-21k
# ViT-T trunk, experts from an ImageNet-21k ViT-S in MoE Jetpack's transfer
# table; `load_from` is written by the recycling tool, see the ImageNet
# config vjetmoe-t_4xb256_in1k.py for how and its limits).
#
#   tools/dist_train.sh configs/moejet/vjetmoe-t_4xb128_food101.py 4
#
# Expected: 89.5 % top-1 on the Food-101 test split (MoE Jetpack's
# figure; dense ViT-T 79.6, dense from ImageNet-21k 86.9, Soft
# MoE from scratch 82.0).
_base_ = [
    '../_base_/models/moejet-vit-t-dual.py',
    '../_base_/datasets/moejet_downstream_224.py',
    '../_base_/schedules/moejet_downstream_100e.py',
    '../_base_/default_runtime.py',
]

model = dict(head=dict(num_classes=101, topk=(1, )))
data_preprocessor = dict(num_classes=101)
train_dataloader = dict(
    dataset=dict(
        type='Food101',
        data_root='data/food101',
        split='train'))
val_dataloader = dict(
    dataset=dict(
        type='Food101',
        data_root='data/food101',
        split='test'))
test_dataloader = val_dataloader

load_from = 'weights/vjetmoe-t_recycled.pth'
