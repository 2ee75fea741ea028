# V-MoE S/16 (every-2, 8 experts, top-2) on timm's ViT-S/16 trunk, started
# from a dense timm ViT-S/16 ImageNet checkpoint by sparse upcycling and
# trained on ImageNet-1k with V-MoE's fine-tuning schedule (SGD, 10k
# iterations, total batch 1024 = 8 x 128).
#
#   python tools/gen_weight/gen_vit_moe_weight.py \
#       configs/vmoe/vmoe-timm-s16-every2_8xb128_in1k-upcycled.py \
#       --dense vit_small_patch16_224.pth --method upcycle \
#       --out weights/vmoe-timm-s16-every2_upcycled.pth
#   tools/dist_train.sh
#   configs/vmoe/vmoe-timm-s16-every2_8xb128_in1k-upcycled.py 8
#
# Any timm ViT-S/16 state dict (.pth / .safetensors, e.g. timm's
# vit_small_patch16_224.augreg_in21k_ft_in1k) fits as it is. Expected: not
# measured here (no ImageNet run on this machine); the upcycled model
# starts from the dense model's accuracy (its experts are copies).
_base_ = [
    '../_base_/models/vmoe-timm-s16-every2.py',
    '../_base_/datasets/imagenet_bs64_vmoe_randaug.py',
    '../_base_/schedules/vmoe_ft_sgd_cosine_10k.py',
    '../_base_/default_runtime.py',
]

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False))
log_processor = dict(by_epoch=False)

load_from = 'weights/vmoe-timm-s16-every2_upcycled.pth'
