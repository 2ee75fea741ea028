# MoE Jetpack's V-JetMoE-T (dual-path SpheroMoE, 98 core + 196 universal
# experts in blocks 6..11) fine-tuned on ImageNet-1k for 300 epochs from
# recycled weights written to `load_from` below by the recycling tool
# (README: "Recycle your dense checkpoint"). The experts are sampled from an
# ImageNet-21k ViT-S (384 dims) narrowed to the ViT-T width by channel
# selection (the same 192 channels and 3 of 6 heads for the whole model):
#   python tools/gen_weight/gen_vit_moe_weight.py THIS_CONFIG \
#       --dense vit_small_in21k.pth --method importance \
#       --calib-data data/imagenet/train --out weights/vjetmoe-t_recycled.pth
# MoE Jetpack's own layout (trunk from an ImageNet-21k ViT-T, each expert
# with its own channels of the ViT-S): add `--trunk vit_tiny_in21k.pth`.
#
#   tools/dist_train.sh configs/moejet/vjetmoe-t_4xb256_in1k.py 4
#
# Expected: 79.9 % top-1 on ImageNet val (MoE Jetpack's figure, experts
# from ViT-S; dense ViT-T 73.9 from scratch, 75.6 from ImageNet-21k; Soft MoE
# from scratch 77.1). From a ViT-T alone no figure is published.
# Total batch 4096 = num_gpus x batch_per_gpu x accumulation: edit only the
# first two numbers, the gradient accumulation follows.
_base_ = [
    '../_base_/models/moejet-vit-t-dual.py',
    '../_base_/datasets/imagenet_bs64_swin_224.py',
    '../_base_/schedules/moejet_adamw_lrdecay_300e.py',
    '../_base_/default_runtime.py',
]

num_gpus = 4
batch_per_gpu = 256
total_batch = 4096
assert total_batch % (num_gpus * batch_per_gpu) == 0, (
    'num_gpus x batch_per_gpu must divide the total batch of 4096')
accumulative_counts = total_batch // (num_gpus * batch_per_gpu)

train_dataloader = dict(batch_size=batch_per_gpu)
val_dataloader = dict(batch_size=batch_per_gpu)
test_dataloader = val_dataloader
optim_wrapper = dict(accumulative_counts=accumulative_counts)

load_from = 'weights/vjetmoe-t_recycled.pth'
randomness = dict(seed=3407)
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=10, max_keep_ckpts=3))
