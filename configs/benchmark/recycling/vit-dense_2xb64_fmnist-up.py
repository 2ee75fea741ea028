# The recycling benchmark on Fashion-MNIST, upstream step: the dense ViT of
# the benchmark (4 blocks of 64 dims, MLP 128, patch 4, 1 channel)
# pretrained on the upstream classes 0-4 (2,000 training images per class),
# evaluated once on 2,000 of their test images.
#
#   tools/dist_train.sh
#   configs/benchmark/recycling/vit-dense_2xb64_fmnist-up.py 2
#
# Expected: about 85 % top-1 on classes 0-4 after 10 epochs (measured
# 84.8 ± 1.2 % over 3 seeds).
_base_ = ['./vmoe_2xb64_fmnist-down.py']

model = dict(backbone=dict(moe_layers=[]))
custom_hooks = []
train_dataloader = dict(
    dataset=dict(classes=[0, 1, 2, 3, 4], per_class=2000, seed=0))
val_dataloader = dict(
    dataset=dict(classes=[0, 1, 2, 3, 4], per_class=400, seed=0))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=2e-3))

max_epochs = 10
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, eta_min=1e-5,
         by_epoch=True, begin=1, end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=max_epochs,
                    max_keep_ckpts=1))
