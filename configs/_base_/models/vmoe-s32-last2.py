# V-MoE S/32 (vmoe_s32_last2_ilsvrc2012_randaug_light1): 512 dims, 8 blocks,
# 8 heads, MLP 2048; sparse MoE (8 experts, top-2) in blocks 5 and 7 with
# capacity factor 1.05 in training and 4.0 at evaluation, routing groups of
# 8 images, expert dropout 0.2; class-token pooling, a 512-unit tanh
# pre-logits layer, zero-initialised classifier with bias -log(1000), and
# sigmoid cross-entropy with mixup 0.2.
model = dict(
    type='MoEImageClassifier',
    aux_loss_weights=dict(importance=0.005, load=0.005, gshard=0.0, z=0.0),
    backbone=dict(
        type='VisionMoE',
        arch='vmoe-s',
        img_size=224,
        patch_size=32,
        moe_layers='last-2',
        out_type='cls_token',
        act='gelu_tanh',
        moe_cfg=dict(
            type='SparseMoE',
            num_experts=8,
            top_k=2,
            capacity_factor=1.05,
            eval_capacity_factor=4.0,
            group_size=8,
            expert_drop=0.2)),
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
