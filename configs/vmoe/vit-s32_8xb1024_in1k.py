# Dense twin of configs/vmoe/vmoe-s32-last2_8xb1024_in1k.py: the same ViT
# (V-MoE's S sizes: 512 dims, 8 blocks), data and schedule, no MoE.
#
#   tools/dist_train.sh configs/vmoe/vit-s32_8xb1024_in1k.py 8
#
# Expected: below the V-MoE's 73.1 %; spec 02 gives no figure for the
# dense model, it is the baseline that measures what the experts add.
_base_ = [
    '../_base_/models/vit-s32-vmoe-sizes.py',
    '../_base_/datasets/imagenet_bs64_vmoe_randaug.py',
    '../_base_/schedules/vmoe_adamw_linear_300e.py',
    '../_base_/default_runtime.py',
]

train_dataloader = dict(batch_size=1024)
val_dataloader = dict(batch_size=256)
test_dataloader = val_dataloader

default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=10, max_keep_ckpts=3))
