"""A V-MoE whose routing is set by hand, its checkpoint and its data.

Images are one flat colour per class (red, green, blue: classes 0, 1, 2),
20 px, patch 4: 25 tokens, no class token. The patch embedding copies each
patch's mean R, G, B into channels 0-2, attention adds nothing (its output
projection is zero), no position embedding; so the MoE layer (block 0) sees
``LN((r, g, b, 0, ..., 0))`` for every token, and the router (``1`` on
channel ``k`` for expert ``k < 3``, 0 for expert 3) sends each class's
tokens to expert = class as first choice and to expert 3 as second.
Block 1 is dense.
"""
import os
import os.path as osp

import numpy as np
import pytest
import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CLASSES = ('0_red', '1_green', '2_blue')
COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
SIZE, PATCH = 20, 4

HAND_CONFIG = """
_base_ = [{runtime!r}]
model = dict(
    type='MoEImageClassifier',
    backbone=dict(
        type='VisionMoE',
        arch=dict(embed_dims=8, num_layers=2, num_heads=2,
                  feedforward_channels=16),
        img_size=20, patch_size=4, moe_layers=[0], with_cls_token=False,
        out_type='gap',
        moe_cfg=dict(type='SparseMoE', num_experts=4, top_k=1,
                     capacity_factor=4.0, noise_std=0.0)),
    neck=None,
    head=dict(type='LinearClsHead', num_classes=3, in_channels=8),
    data_preprocessor=dict(num_classes=3, mean=[127.5] * 3,
                           std=[127.5] * 3, to_rgb=True))
pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
val_dataloader = dict(
    batch_size=4, num_workers=0,
    dataset=dict(type='CustomDataset', data_root={data_root!r},
                 data_prefix='val', pipeline=pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
"""


def write_colour_folder(root, per_class=2):
    from PIL import Image
    for cls, colour in zip(CLASSES, COLOURS):
        folder = osp.join(root, 'val', cls)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            img = np.empty((SIZE, SIZE, 3), np.uint8)
            img[:] = colour
            Image.fromarray(img).save(osp.join(folder, f'{i}.png'))
    return root


def set_hand_routing(model):
    """The weights described in the module docstring."""
    backbone = model.backbone
    with torch.no_grad():
        conv = backbone.patch_embed.projection
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(3):
            conv.weight[c, c] = 1.0 / PATCH**2
        backbone.pos_embed.zero_()
        block = backbone.layers[0]
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()
        block.ln2.weight.fill_(1.0)
        block.ln2.bias.zero_()
        router = block.ffn.router.weight
        router.zero_()
        for k in range(3):
            router[k, k] = 1.0
    return model


def hand_gates():
    """The router's softmax for a red token, computed by hand."""
    x = torch.tensor([1.0, -1.0, -1.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    normed = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-6)
    logits = torch.cat([normed[:3], torch.zeros(1, dtype=x.dtype)])
    return logits.softmax(0)


@pytest.fixture(scope='session')
def hand_routed(tmp_path_factory):
    """``(config, checkpoint, data_root)`` of the hand-routed model."""
    from mmengine.config import Config
    from mmengine.logging import HistoryBuffer
    from mmpretrain.registry import MODELS

    import moe_plugin  # noqa: F401
    root = tmp_path_factory.mktemp('hand_routed')
    data_root = write_colour_folder(str(root / 'data'))
    config = root / 'vmoe-hand_1xb4_colours.py'
    config.write_text(
        HAND_CONFIG.format(
            runtime=osp.join(REPO_ROOT, 'configs', '_base_',
                             'default_runtime.py'),
            data_root=data_root))
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(config)).model)
    model.init_weights()
    set_hand_routing(model)
    checkpoint = root / 'hand.pth'
    # Shaped like a run's checkpoint: a message hub that needs the scoped
    # allow-list of moe_plugin.compat to load.
    torch.save(
        dict(
            meta=dict(dataset_meta=dict(classes=list(CLASSES))),
            state_dict=model.state_dict(),
            message_hub=dict(log_scalars={
                'train/loss': HistoryBuffer([1.0, 0.5], [1, 1])
            })),
        str(checkpoint))
    return str(config), str(checkpoint), data_root
