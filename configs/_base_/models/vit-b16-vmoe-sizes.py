# Dense twin of V-MoE B/16 on ImageNet-21k: MMPretrain's plain
# VisionTransformer (768 dims, 12 blocks, 12 heads, MLP 3072), tanh-GELU,
# class token, 768-unit tanh pre-logits, 21,843 classes with bias -10,
# sigmoid cross-entropy with mixup 0.5.
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='VisionTransformer',
        arch='b',
        img_size=224,
        patch_size=16,
        out_type='cls_token',
        layer_cfgs=dict(act_cfg=dict(type='GELU', approximate='tanh'))),
    neck=None,
    head=dict(
        type='VisionTransformerClsHead',
        num_classes=21843,
        in_channels=768,
        hidden_dim=768,
        loss=dict(type='CrossEntropyLoss', use_sigmoid=True),
        init_cfg=dict(type='Constant', layer='Linear', val=0, bias=-10.0),
        topk=(1, 5)),
    train_cfg=dict(augments=dict(type='Mixup', alpha=0.5)),
)
