# Step 3 of the recycling demo, the baseline an MoE must beat: the dense
# upstream ViT itself fine-tuned on classes 5-9 with a new head, same
# schedule as the MoE runs.
#
#   tools/dist_train.sh configs/demo/recycling/vit-dense_2xb64_digits-down.py 2
#
# Expected: about 95 % val top-1 after 24 epochs (measured 95.0 %; the
# `dense_finetune` row of work_dirs/demo/summary.json).
_base_ = ['./vmoe_2xb64_digits-down.py']

model = dict(backbone=dict(moe_layers=[]))
