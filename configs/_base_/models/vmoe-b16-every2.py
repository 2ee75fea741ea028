# V-MoE B/16 (vmoe_b16_imagenet21k_randaug_strong): 768 dims, 12 blocks,
# 12 heads, MLP 3072; sparse MoE (8 experts, top-2) in every second block
# (1, 3, ..., 11), capacity factor 1.05, routing groups of 8 images; class
# token, a 768-unit tanh pre-logits layer, zero-initialised classifier
# over ImageNet-21k's 21,843 classes with bias -10, sigmoid cross-entropy
# with mixup 0.5.
model = dict(
    type='MoEImageClassifier',
    aux_loss_weights=dict(importance=0.005, load=0.005, gshard=0.0, z=0.0),
    backbone=dict(
        type='VisionMoE',
        arch='vmoe-b',
        img_size=224,
        patch_size=16,
        moe_layers='every-2',
        out_type='cls_token',
        act='gelu_tanh',
        moe_cfg=dict(
            type='SparseMoE',
            num_experts=8,
            top_k=2,
            capacity_factor=1.05,
            group_size=8)),
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
