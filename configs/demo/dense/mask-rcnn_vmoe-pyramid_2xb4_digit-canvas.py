# Dense-prediction demo, detection, MoE backbone: as the dense config, with
# MoE blocks 1 and 3 (4 experts, top-2) upcycled from the same dense
# digits classifier (RecycleDenseInit), and loss_moe_aux added to Mask
# R-CNN's losses by MoEAuxLossHook.
#
#   tools/dist_train.sh \
#       configs/demo/dense/mask-rcnn_vmoe-pyramid_2xb4_digit-canvas.py 2 \
#       --cfg-options model.backbone.init_cfg.checkpoint=DENSE.pth
#
# Expected: none published; tools/demo/dense_prediction_demo.py records
# bbox_mAP in summary.json.
_base_ = ['./mask-rcnn_vit-pyramid_2xb4_digit-canvas.py']

model = dict(
    backbone=dict(
        moe_layers='every-2',
        moe_cfg=dict(type='SparseMoE', num_experts=4, top_k=2,
                     capacity_factor=1.05, eval_capacity_factor=2.0)))
custom_hooks = [dict(type='MoEAuxLossHook')]
