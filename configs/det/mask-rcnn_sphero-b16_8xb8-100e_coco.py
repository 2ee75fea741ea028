# Mask R-CNN with a ViTDet-style SpheroMoE ViT-B/16 backbone on COCO: the
# recipe of mask-rcnn_vmoe-b16-sfp_8xb8-100e_coco.py with MoE
# Jetpack's dual-path SpheroMoE (core and universal experts, slots, entmax
# combine) in the last 6 blocks, recycled from a dense ViT-B/16 by
# RecycleDenseInit (method 'uniform': experts narrower than the dense MLP).
#
#   tools/dist_train.sh configs/det/mask-rcnn_sphero-b16_8xb8-100e_coco.py 8
#   (dense checkpoint: --cfg-options model.backbone.init_cfg.checkpoint=X)
#
# Expected: none published (MoE Jetpack reports classification only).
_base_ = ['./mask-rcnn_vmoe-b16-sfp_8xb8-100e_coco.py']

model = dict(
    backbone=dict(
        moe_layers='last-6-blocks',
        moe_cfg=dict(
            _delete_=True,
            type='SpheroMoE',
            num_experts=98,
            num_universal_experts=196,
            univ_factor=0.25,
            slots_per_expert=1,
            normalize_keys=True,
            slot_layernorm=True,
            combine='entmax15',
            expert_drop=0.1),
        init_cfg=dict(method='uniform')))
