# Soft MoE B/16: a ViT-B/16 (768 dims, 12 blocks, 12 heads, MLP 3072) whose
# last 6 blocks hold a Soft MoE with 128 experts of 1 slot each (Soft MoE's
# B/16 128E), multi-head attention pooling, trained on ImageNet-1k with the
# same recipe as the S/16 config.
#
#   tools/dist_train.sh configs/soft_moe/softmoe-b16-128e_8xb512_in1k.py 8
#
# Expected: the paper's 88.0 % ImageNet top-1 (ViT B/16: 86.6) comes from
# pre-training on JFT-4B and fine-tuning; trained on ImageNet-1k alone no
# figure is published for this model.
_base_ = ['./softmoe-s16-128e_8xb512_in1k.py']

model = dict(
    backbone=dict(arch='vmoe-b'),
    head=dict(in_channels=768),
)
