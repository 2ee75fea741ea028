# V-MoE B/16, MoE in every second block, 8 experts, top-2, trained from
# scratch on ImageNet-21k (V-MoE's vmoe_b16_imagenet21k_randaug_strong),
# with ViT's ImageNet-21k schedule (90 epochs, batch 4096, Adam lr 1e-3).
#
#   tools/dist_train.sh configs/vmoe/vmoe-b16-every2_8xb512_in21k.py 8 --amp
#
# Expected: V-MoE reports no ImageNet-21k figure for this model; it is the
# upstream of configs/vmoe/vmoe-b16-every2_8xb128_in1k-384px.py (85.6 %).
# Total batch 4096 = 8 GPUs x 512. With less memory per GPU keep the total:
# --cfg-options train_dataloader.batch_size=128
# optim_wrapper.accumulative_counts=4.
_base_ = [
    '../_base_/models/vmoe-b16-every2.py',
    '../_base_/datasets/imagenet21k_bs64_vmoe_randaug.py',
    '../_base_/schedules/vit_adamw_linear_90e_in21k.py',
    '../_base_/default_runtime.py',
]

train_dataloader = dict(batch_size=512)
val_dataloader = dict(batch_size=256)
test_dataloader = val_dataloader

default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=5, max_keep_ckpts=3))
