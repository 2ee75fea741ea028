"""Every config under configs/ loads, builds its model and its pipelines."""
import glob
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmpretrain.registry import MODELS, TRANSFORMS

import moe_plugin  # noqa: F401
from moe_plugin.layers import SparseMoE, is_moe_layer

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: Detection / segmentation configs: tests/dense/test_dense_configs.py.
DENSE_FOLDERS = ('configs/det/', 'configs/seg/', 'configs/demo/dense/')
CONFIGS = sorted(
    osp.relpath(p, REPO_ROOT)
    for p in glob.glob(osp.join(REPO_ROOT, 'configs', '**', '*.py'),
                       recursive=True) if '_base_' not in p
    and not osp.relpath(p, REPO_ROOT).startswith(DENSE_FOLDERS))


def load(path):
    return Config.fromfile(osp.join(REPO_ROOT, path))


def moe_blocks(model):
    """Indices of the ViT blocks whose FFN is an MoE layer (any module with
    ``moe_metrics``, as :class:`MoEImageClassifier` finds them)."""
    indices = set()
    for name, module in model.named_modules():
        if is_moe_layer(module):
            match = re.search(r'layers\.(\d+)\.', name)
            indices.add(int(match.group(1)) if match else name)
    return sorted(indices, key=lambda i: (isinstance(i, str), str(i).zfill(4)))


def vit_param_count(dims, depth, mlp, img, patch, classes, pre_logits,
                    moe_blocks=(), experts=0):
    """Parameters of a pre-LN ViT (+ MoE FFNs), counted by hand."""
    tokens = (img // patch)**2 + 1
    embed = 3 * patch * patch * dims + dims + dims + tokens * dims
    attn = 2 * dims + dims * 3 * dims + 3 * dims + dims * dims + dims
    ffn = 2 * dims + dims * mlp + mlp + mlp * dims + dims
    moe = 2 * dims + experts * (dims * mlp + mlp + mlp * dims + dims) + \
        dims * experts
    blocks = sum(attn + (moe if i in moe_blocks else ffn)
                 for i in range(depth))
    head_in = dims
    head = 0
    if pre_logits:
        head += dims * pre_logits + pre_logits
        head_in = pre_logits
    head += head_in * classes + classes
    return embed + blocks + 2 * dims + head


def test_configs_are_found():
    assert 'configs/demo/vmoe-demo_2xb64_digits.py' in CONFIGS
    assert len([c for c in CONFIGS if c.startswith('configs/vmoe/')]) >= 6


@pytest.mark.parametrize('path', CONFIGS)
def test_config_builds(path):
    cfg = load(path)
    header = open(osp.join(REPO_ROOT, path)).read().split('_base_')[0]
    # The header gives the command and the expected figure.
    assert f'dist_train.sh {path}' in header.replace('\n#   ', ' ')
    assert 'Expected' in header
    assert not any('::' in base for base in cfg.get('_base_', []))
    assert cfg.custom_imports.imports == ['moe_plugin']

    # Model: on the meta device (no memory, no init) for the big ones;
    # MMPretrain's ResNet reads a tensor value while building, so it is
    # built for real.
    try:
        with torch.device('meta'):
            model = MODELS.build(cfg.model)
    except RuntimeError as error:
        if 'meta' not in str(error):
            raise
        model = MODELS.build(cfg.model)
    assert cfg.data_preprocessor.num_classes == cfg.model.head.num_classes
    if cfg.model.type == 'MoEImageClassifier' and not (
            cfg.model.backbone.get('moe_layers', None) == []):
        assert moe_blocks(model), path
    else:
        assert not moe_blocks(model), path

    for loader in ('train_dataloader', 'val_dataloader'):
        for transform in cfg[loader].dataset.pipeline:
            TRANSFORMS.build(transform)


def test_vmoe_s32_matches_the_paper_model():
    cfg = load('configs/vmoe/vmoe-s32-last2_8xb1024_in1k.py')
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    assert moe_blocks(model) == [5, 7]
    moe = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert moe[0].num_experts == 8 and moe[0].top_k == 2
    assert moe[0].capacity_factor == 1.05
    assert moe[0].eval_capacity_factor == 4.0
    assert sum(p.numel() for p in model.parameters()) == vit_param_count(
        512, 8, 2048, 224, 32, 1000, 512, moe_blocks=(5, 7), experts=8)
    # The dense twin is the same network without the experts.
    dense_cfg = load('configs/vmoe/vit-s32_8xb1024_in1k.py')
    with torch.device('meta'):
        dense = MODELS.build(dense_cfg.model)
    assert sum(p.numel() for p in dense.parameters()) == vit_param_count(
        512, 8, 2048, 224, 32, 1000, 512)
    assert dense_cfg.optim_wrapper == cfg.optim_wrapper
    assert dense_cfg.param_scheduler == cfg.param_scheduler


def test_vmoe_b16_and_fine_tunes():
    cfg = load('configs/vmoe/vmoe-b16-every2_8xb512_in21k.py')
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    assert moe_blocks(model) == [1, 3, 5, 7, 9, 11]
    assert cfg.model.head.num_classes == 21843
    assert cfg.model.head.init_cfg.bias == -10.0
    # Total batch 8 GPUs x 512 = the recipe's 4096.
    assert 8 * cfg.train_dataloader.batch_size == \
        cfg.auto_scale_lr.base_batch_size == 4096

    s32 = load('configs/vmoe/vmoe-s32-last2_8xb1024_in1k.py')
    assert 8 * s32.train_dataloader.batch_size == \
        s32.auto_scale_lr.base_batch_size == 8192
    assert s32.model.head.loss.use_sigmoid
    assert s32.model.train_cfg.augments.alpha == 0.2

    for path in ('configs/vmoe/vmoe-s32-last2_8xb128_in1k-384px.py',
                 'configs/vmoe/vmoe-b16-every2_8xb128_in1k-384px.py'):
        ft = load(path)
        assert ft.model.backbone.img_size == 384
        assert ft.model.backbone.moe_cfg.capacity_factor == 1.5
        assert ft.optim_wrapper.optimizer.type == 'SGD'
        assert ft.optim_wrapper.clip_grad.max_norm == 10.0
        assert ft.train_cfg.max_iters == 10000
        assert 8 * ft.train_dataloader.batch_size == 1024
        assert ft.load_from.startswith('weights/')


def test_demo_config_builds_trains_a_step_and_reads_data(tmp_path):
    from mmpretrain.registry import DATASETS

    from moe_plugin.datasets import prepare_digits
    cfg = load('configs/demo/vmoe-demo_2xb64_digits.py')
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert moe_blocks(model) == [1, 3]
    root = prepare_digits(str(tmp_path / 'digits'))
    for loader, count in (('train_dataloader', 1438), ('val_dataloader',
                                                       359)):
        dataset_cfg = cfg[loader].dataset.copy()
        dataset_cfg.data_root = root
        dataset = DATASETS.build(dataset_cfg)
        assert len(dataset) == count
        assert dataset.metainfo['classes'] == tuple(str(i) for i in range(10))
    sample = dataset[0]
    assert sample['inputs'].shape == (3, 32, 32)
    data = model.data_preprocessor(
        dict(
            inputs=[sample['inputs']] * 4,
            data_samples=[sample['data_samples']] * 4), True)
    losses = model(**data, mode='loss')
    assert {'loss_cls', 'loss_moe_aux'} <= set(losses)
    assert torch.isfinite(sum(v for k, v in losses.items() if 'loss' in k))


def test_moejet_recipe_and_downstream_configs():
    from moe_plugin.layers import SpheroMoE
    cfg = load('configs/moejet/vjetmoe-t_4xb256_in1k.py')
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    assert moe_blocks(model) == [6, 7, 8, 9, 10, 11]
    layers = [m for m in model.modules() if isinstance(m, SpheroMoE)]
    assert all(m.num_core_experts == 98 and m.num_universal_experts == 196
               for m in layers)
    assert layers[0].core_experts.w1.shape == (98, 192, 768)
    assert layers[0].univ_experts.w1.shape == (196, 192, 192)
    assert layers[0].combine == 'entmax15'
    assert layers[0].noise_mult == pytest.approx(1 / 294)
    # MoE drop path linear in depth up to 0.1 at block 11.
    assert layers[-1].drop_path.drop_prob == pytest.approx(0.1)
    # Total batch 4096 = 4 GPUs x 256 x accumulation 4, derived.
    assert cfg.num_gpus * cfg.batch_per_gpu * \
        cfg.optim_wrapper.accumulative_counts == 4096
    assert cfg.optim_wrapper.accumulative_counts == 4
    assert cfg.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.6
    assert cfg.load_from.startswith('weights/')
    assert load('configs/moejet/vjetmoe-t_4xb256_in1k-scratch.py'
                ).load_from is None
    classes = dict(cifar10=10, cifar100=100, flowers102=102, pets=37,
                   dtd=47, food101=101, stl10=10, svhn=10)
    for name, count in classes.items():
        ds = load(f'configs/moejet/vjetmoe-t_4xb128_{name}.py')
        assert ds.model.head.num_classes == count, name
        assert ds.data_preprocessor.num_classes == count, name
        assert ds.model.backbone.moe_cfg.num_universal_experts == 196


def test_soft_moe_configs():
    from moe_plugin.layers import SoftMoE
    for path, dims in (('configs/soft_moe/softmoe-s16-128e_8xb512_in1k.py',
                        384),
                       ('configs/soft_moe/softmoe-b16-128e_8xb512_in1k.py',
                        768)):
        with torch.device('meta'):
            model = MODELS.build(load(path).model)
        assert moe_blocks(model) == [6, 7, 8, 9, 10, 11]
        layers = [m for m in model.modules() if isinstance(m, SoftMoE)]
        assert all(m.num_experts == 128 and m.slots_per_expert == 1
                   for m in layers)
        assert layers[0].mu.shape == (dims, 128, 1)
