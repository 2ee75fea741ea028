# The same V-JetMoE-T trained from scratch (random initialisation) on
# ImageNet-1k with the same 300-epoch recipe: the baseline that shows what
# checkpoint recycling brings.
#
#   tools/dist_train.sh configs/moejet/vjetmoe-t_4xb256_in1k-scratch.py 4
#
# Expected: no figure is published for this exact model; MoE Jetpack's
# closest baseline, a Soft MoE ViT-T trained from scratch, reaches 77.1 %
# top-1 on ImageNet val (79.9 with recycled weights).
_base_ = ['./vjetmoe-t_4xb256_in1k.py']

load_from = None
