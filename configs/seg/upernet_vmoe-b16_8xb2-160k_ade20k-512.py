# UperNet with a V-MoE-B/16 backbone on ADE20K, MMSegmentation's ViT-B/16
# recipe (vit_vit-b16_mln_upernet_8xb2-160k): the maps of blocks 2, 5, 8,
# 11 (stride 16) through MultiLevelNeck (strides 4-32) into UPerHead, an
# FCN auxiliary head, 512 px crops, AdamW lr 6e-5 with poly decay, 160k
# iterations at batch 16. Every other block's FFN is a sparse MoE (8
# experts, top-2) upcycled from a dense ViT-B/16 by RecycleDenseInit.
#
#   tools/dist_train.sh configs/seg/upernet_vmoe-b16_8xb2-160k_ade20k-512.py 8
#
# Expected: none published for an MoE backbone; the dense ViT-B/16 of that
# MMSegmentation recipe reaches 46.75 mIoU (48.46 multi-scale + flip).
_base_ = [
    './_base_/models/upernet_vit-b16_ln_mln.py',
    './_base_/datasets/ade20k.py', './_base_/default_runtime.py',
    './_base_/schedules/schedule_160k.py'
]
custom_imports = dict(imports=['moe_plugin.seg'], allow_failed_imports=False)

crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='VisionMoE',
        arch='vmoe-b',
        img_size=512,
        patch_size=16,
        act='gelu',
        out_type='featmap',
        out_indices=(2, 5, 8, 11),
        final_norm=False,
        moe_layers='every-2',
        moe_cfg=dict(type='SparseMoE', num_experts=8, top_k=2,
                     capacity_factor=1.05, eval_capacity_factor=2.0),
        init_cfg=dict(type='RecycleDenseInit',
                      checkpoint='weights/vit-b16_in21k.pth')),
    decode_head=dict(num_classes=150, norm_cfg=dict(type='BN',
                                                    requires_grad=True)),
    auxiliary_head=dict(num_classes=150, norm_cfg=dict(type='BN',
                                                       requires_grad=True)))
custom_hooks = [dict(type='MoEAuxLossHook')]

# tools/train.py defaults to MMPretrain's default_collate.
train_dataloader = dict(batch_size=2, collate_fn=dict(type='pseudo_collate'))
val_dataloader = dict(batch_size=1, collate_fn=dict(type='pseudo_collate'))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999),
                   weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'pos_embed': dict(decay_mult=0.),
        'cls_token': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
        'router': dict(decay_mult=0.),
    }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
         end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000,
         by_epoch=False),
]
