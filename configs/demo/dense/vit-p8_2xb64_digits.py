# Step 1 of the dense-prediction demo (tools/demo/dense_prediction_demo.py,
# `make dense-demo`): the dense classification checkpoint that both the
# dense and the MoE detection / segmentation backbones start from. A ViT of
# 4 blocks of 64 dims (MLP 128), patch 8 on the 32x32 digits.
#
#   python tools/prepare_digits.py
#   tools/dist_train.sh configs/demo/dense/vit-p8_2xb64_digits.py 2
#
# Expected: none published; the demo records its val top-1 in summary.json.
_base_ = ['../vmoe-demo_2xb64_digits.py']

# MoEImageClassifier without MoE layers is a plain ImageClassifier.
model = dict(backbone=dict(patch_size=8, moe_layers=[]))

max_epochs = 15
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
