# The recycling benchmark on Fashion-MNIST, dual path: MoE Jetpack's
# SpheroMoE (16 core + 32 universal experts of 1 slot, cosine routing,
# softmax combine) in the last 2 blocks of the benchmark's ViT, mean
# pooling, fine-tuned from the dense upstream ViT recycled with `--method
# importance` (experts sampled by activation on upstream training images:
# `sphero_importance`). Same recipe, data and epochs as the other runs
# (vmoe_2xb64_fmnist-down.py).
#
#   tools/dist_train.sh
#   configs/benchmark/recycling/spheromoe_2xb64_fmnist-down.py 2
#
# Expected (3 seeds, docs/recycling_benchmark.md): 76.4 % top-1 (mean) after
# 16 epochs.
_base_ = ['./vmoe_2xb64_fmnist-down.py']

model = dict(
    aux_loss_weights=dict(importance=0.0, load=0.0, gshard=0.0, z=0.0),
    backbone=dict(
        out_type='avg_featmap',
        final_norm=False,
        moe_layers='last-2-blocks',
        moe_drop_path_rate=0.1,
        moe_cfg=dict(
            _delete_=True,
            type='SpheroMoE',
            num_experts=16,
            num_universal_experts=32,
            univ_factor=0.25,
            slots_per_expert=1,
            combine='softmax',
            expert_drop=0.1)),
    head=dict(_delete_=True, type='LinearClsHead', num_classes=5,
              in_channels=64,
              loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1)))
