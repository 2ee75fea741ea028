# V-MoE on the trunk of timm's ViT-S/16 (vit_small_patch16_224): 384 dims,
# 12 blocks, 6 heads, MLP 1536, exact GELU, class token, final LayerNorm,
# a plain 1000-class classifier. Every second block's MLP (1, 3, ..., 11)
# is a sparse MoE (8 experts, top-2, capacity factor 1.05, routing groups
# of 8 images), so a timm ViT-S/16 checkpoint upcycles into it as it is:
#   tools/gen_weight/gen_vit_moe_weight.py CONFIG \
#       --dense vit_small_patch16_224.pth --method upcycle
# (V-MoE's own "S" is 8 blocks of 512: configs/_base_/models/
# vmoe-s32-last2.py.) ViT-B/16: configs/vmoe/vmoe-timm-b16-every2_*.py.
model = dict(
    type='MoEImageClassifier',
    aux_loss_weights=dict(importance=0.005, load=0.005, gshard=0.0, z=0.0),
    backbone=dict(
        type='VisionMoE',
        arch=dict(
            embed_dims=384,
            num_layers=12,
            num_heads=6,
            feedforward_channels=1536),
        img_size=224,
        patch_size=16,
        moe_layers='every-2',
        out_type='cls_token',
        act='gelu',
        moe_cfg=dict(
            type='SparseMoE',
            num_experts=8,
            top_k=2,
            capacity_factor=1.05,
            group_size=8)),
    neck=None,
    head=dict(
        type='VisionTransformerClsHead',
        num_classes=1000,
        in_channels=384,
        loss=dict(
            type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        topk=(1, 5)),
)
