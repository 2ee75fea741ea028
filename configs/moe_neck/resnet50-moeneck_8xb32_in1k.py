# ResNet-50 with an MoE stage: the 7x7x2048 map of the last stage is taken
# as 49 tokens, projected to 512 dims and passed through 2 pre-LN residual
# V-MoE blocks (8 experts of hidden width 2048, top-2) before average
# pooling. MMPretrain's ResNet-50 recipe otherwise (SGD, 100 epochs).
#
#   tools/dist_train.sh configs/moe_neck/resnet50-moeneck_8xb32_in1k.py 8
#
# Expected: no paper reports this model; about MMPretrain's dense ResNet-50
# (76.55 % top-1, resnet50_8xb32_in1k) or slightly above. Not measured here.
_base_ = [
    '../_base_/datasets/resnet_imagenet_bs32.py',
    '../_base_/schedules/resnet_sgd_step_100e.py',
    '../_base_/default_runtime.py',
]

model = dict(
    type='MoEImageClassifier',
    aux_loss_weights=dict(importance=0.005, load=0.005, gshard=0.0, z=0.0),
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(3, ),
        style='pytorch'),
    neck=dict(
        type='MoENeck',
        in_channels=2048,
        embed_dims=512,
        num_blocks=2,
        feedforward_channels=2048,
        pool='gap',
        moe_cfg=dict(
            type='SparseMoE',
            num_experts=8,
            top_k=2,
            capacity_factor=1.05,
            eval_capacity_factor=2.0)),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=512,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5)),
)
