# MoE Jetpack's V-JetMoE-T (vit_tiny_dual_moe_timm_21k_ft.py): a ViT-T trunk
# (192 dims, 12 blocks, 3 heads, MLP 768, patch 16, exact GELU, drop path
# 0.1) whose last 6 blocks (6..11) hold a dual-path SpheroMoE with 98 core
# experts (hidden 768) and 196 universal experts (hidden 192), 1 slot each,
# slot LayerNorm, normalised keys, entmax-1.5 combine, training noise
# 1 / 294, expert dropout 0.4 and MoE drop path up to 0.1; mean pooling of
# the patch tokens then `fc_norm` (MMPretrain's avg_featmap without the
# final norm), label smoothing 0.1, Mixup 0.8 / CutMix 1.0.
model = dict(
    type='MoEImageClassifier',
    backbone=dict(
        type='VisionMoE',
        arch='deit-tiny',
        img_size=224,
        patch_size=16,
        act='gelu',
        out_type='avg_featmap',
        final_norm=False,
        drop_path_rate=0.1,
        moe_layers='last-6-blocks',
        moe_drop_path_rate=0.1,
        moe_cfg=dict(
            type='SpheroMoE',
            num_experts=98,
            num_universal_experts=196,
            univ_factor=0.25,
            slots_per_expert=1,
            normalize_keys=True,
            slot_layernorm=True,
            combine='entmax15',
            expert_drop=0.4)),
    neck=None,
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=192,
        loss=dict(
            type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        topk=(1, 5)),
    init_cfg=[
        dict(type='TruncNormal', layer='Linear', std=.02),
        dict(type='Constant', layer='LayerNorm', val=1., bias=0.),
    ],
    train_cfg=dict(augments=[
        dict(type='Mixup', alpha=0.8),
        dict(type='CutMix', alpha=1.0),
    ]),
)
