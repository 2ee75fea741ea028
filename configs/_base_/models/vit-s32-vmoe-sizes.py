# Dense twin of V-MoE S/32: MMPretrain's plain VisionTransformer with
# V-MoE's S sizes (512 dims, 8 blocks, 8 heads, MLP 2048; not DeiT's S),
# tanh-GELU, LayerNorm eps 1e-6, class token, 512-unit tanh pre-logits,
# sigmoid cross-entropy with mixup 0.2.
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='VisionTransformer',
        arch=dict(
            embed_dims=512,
            num_layers=8,
            num_heads=8,
            feedforward_channels=2048),
        img_size=224,
        patch_size=32,
        out_type='cls_token',
        layer_cfgs=dict(act_cfg=dict(type='GELU', approximate='tanh'))),
    neck=None,
    head=dict(
        type='VisionTransformerClsHead',
        num_classes=1000,
        in_channels=512,
        hidden_dim=512,
        loss=dict(type='CrossEntropyLoss', use_sigmoid=True),
        init_cfg=dict(type='Constant', layer='Linear', val=0, bias=-6.9078),
        topk=(1, 5)),
    train_cfg=dict(augments=dict(type='Mixup', alpha=0.2)),
)
