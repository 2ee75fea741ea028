# Step 1 of the recycling demo (`make demo`, tools/demo/recycling_demo.py):
# a small dense ViT (4 blocks of 64 dims, MLP 128) pretrained on the
# upstream half of the digits, classes 0-4 (data/digits_up, written by the
# demo script).
#
#   tools/dist_train.sh configs/demo/recycling/vit-dense_2xb64_digits-up.py 2
#
# Expected: >= 95 % val top-1 on classes 0-4 after 30 epochs (measured
# 99.4 %).
_base_ = ['../vmoe-demo_2xb64_digits.py']

# MoEImageClassifier without MoE layers is a plain ImageClassifier (its aux
# loss is 0); keeping the demo's classifier keeps one config lineage.
model = dict(backbone=dict(moe_layers=[]), head=dict(num_classes=5))
data_preprocessor = dict(num_classes=5)
train_dataloader = dict(dataset=dict(data_root='data/digits_up'))
val_dataloader = dict(dataset=dict(data_root='data/digits_up'))
test_dataloader = val_dataloader

max_epochs = 30
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
