# Dense twin of configs/vmoe/vmoe-b16-every2_8xb512_in21k.py: ViT-B/16 on
# ImageNet-21k with the same data and schedule, no MoE.
#
#   tools/dist_train.sh configs/vmoe/vit-b16_8xb512_in21k.py 8 --amp
#
# Expected: no figure in spec 02 (upstream model); the baseline for the
# V-MoE B/16 run.
_base_ = [
    '../_base_/models/vit-b16-vmoe-sizes.py',
    '../_base_/datasets/imagenet21k_bs64_vmoe_randaug.py',
    '../_base_/schedules/vit_adamw_linear_90e_in21k.py',
    '../_base_/default_runtime.py',
]

train_dataloader = dict(batch_size=512)
val_dataloader = dict(batch_size=256)
test_dataloader = val_dataloader

default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=5, max_keep_ckpts=3))
