# The recycling benchmark on Fashion-MNIST, the baseline an MoE must beat:
# the dense upstream ViT itself fine-tuned on the downstream classes with a
# new head (`dense_finetune`), with exactly the recipe, data, augmentation
# and epochs of the MoE runs (vmoe_2xb64_fmnist-down.py).
#
#   tools/dist_train.sh
#   configs/benchmark/recycling/vit-dense_2xb64_fmnist-down.py 2
#
# Expected (3 seeds, docs/recycling_benchmark.md): 81.4 % top-1 (mean) after
# 16 epochs.
_base_ = ['./vmoe_2xb64_fmnist-down.py']

# MoEImageClassifier without MoE layers is a plain ImageClassifier (its aux
# loss is 0).
model = dict(backbone=dict(moe_layers=[]))
custom_hooks = []
