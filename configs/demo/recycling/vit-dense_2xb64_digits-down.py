# Step 3 of the recycling demo, the baseline an MoE must beat: the dense
# upstream ViT itself fine-tuned on classes 5-9 with a new head, same
# schedule as the MoE runs.
#
#   tools/dist_train.sh configs/demo/recycling/vit-dense_2xb64_digits-down.py 2
#
# Expected: see work_dirs/demo/summary.json (the `dense_finetune` row).
_base_ = ['./vmoe_2xb64_digits-down.py']

model = dict(backbone=dict(moe_layers=[]))
