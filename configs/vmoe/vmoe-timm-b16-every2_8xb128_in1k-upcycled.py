# V-MoE B/16 (every-2, 8 experts, top-2) on timm's ViT-B/16 trunk (768
# dims, 12 blocks, 12 heads, MLP 3072), started
# from a dense timm ViT-B/16 ImageNet checkpoint by sparse upcycling and
# trained on ImageNet-1k with V-MoE's fine-tuning schedule (SGD, 10k
# iterations, total batch 1024 = 8 x 128).
#
#   python tools/gen_weight/gen_vit_moe_weight.py \
#       configs/vmoe/vmoe-timm-b16-every2_8xb128_in1k-upcycled.py \
#       --dense vit-b16.pth --method upcycle \
#       --out weights/vmoe-timm-b16-every2_upcycled.pth
#   tools/dist_train.sh
#   configs/vmoe/vmoe-timm-b16-every2_8xb128_in1k-upcycled.py 8
#
# Expected: not measured here (no ImageNet run on this machine).
_base_ = ['./vmoe-timm-s16-every2_8xb128_in1k-upcycled.py']

model = dict(
    backbone=dict(
        arch=dict(
            embed_dims=768,
            num_layers=12,
            num_heads=12,
            feedforward_channels=3072)),
    head=dict(in_channels=768))

load_from = 'weights/vmoe-timm-b16-every2_upcycled.pth'
