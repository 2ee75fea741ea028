# UperNet with a ConvNeXt-MoE-T backbone on ADE20K, the ConvNeXt-T recipe
# of MMSegmentation (convnext-tiny_upernet_8xb2-amp-160k): stages at
# strides 4-32 into UPerHead, drop path 0.4, AdamW lr 1e-4, 160k
# iterations at batch 16, mixed precision. The pointwise MLPs of the last
# 3 blocks of stage 3 and of every block of stage 4 are sparse MoEs (8
# experts, top-2) upcycled from a dense ConvNeXt-T classification
# checkpoint (timm or MMPretrain) by RecycleDenseInit. Plain layer-wise
# decay-free AdamW (MMSegmentation's stage-wise decay constructor does not
# know the MoE parameter names).
#
#   tools/dist_train.sh configs/seg/upernet_cnxmoe-t_8xb2-160k_ade20k-512.py 8
#
# Expected: none published for an MoE backbone; the dense ConvNeXt-T of that
# MMSegmentation recipe reaches 46.11 mIoU (46.62 multi-scale + flip).
_base_ = [
    './_base_/models/upernet_convnext.py', './_base_/datasets/ade20k.py',
    './_base_/default_runtime.py', './_base_/schedules/schedule_160k.py'
]
custom_imports = dict(imports=['moe_plugin.seg'], allow_failed_imports=False)

crop_size = (512, 512)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='ConvNeXtMoE',
        arch='tiny',
        out_indices=[0, 1, 2, 3],
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        gap_before_final_norm=False,
        img_size=512,
        moe_blocks=[[], [], [-3, -2, -1], 'all'],
        moe_cfg=dict(type='SparseMoE', num_experts=8, top_k=2,
                     capacity_factor=1.05, eval_capacity_factor=2.0,
                     act='gelu'),
        init_cfg=dict(type='RecycleDenseInit',
                      checkpoint='weights/convnext-tiny_in1k.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150,
                     norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=384, num_classes=150,
                        norm_cfg=norm_cfg),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))
custom_hooks = [dict(type='MoEAuxLossHook')]

# tools/train.py defaults to MMPretrain's default_collate.
train_dataloader = dict(batch_size=2, collate_fn=dict(type='pseudo_collate'))
val_dataloader = dict(batch_size=1, collate_fn=dict(type='pseudo_collate'))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'router': dict(decay_mult=0.)}),
    loss_scale='dynamic')
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
         end=1500),
    dict(type='PolyLR', power=1.0, begin=1500, end=160000, eta_min=0.0,
         by_epoch=False),
]
