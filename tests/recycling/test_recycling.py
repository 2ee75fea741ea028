"""Recycling dense ViTs into MoE weights: function preservation against
timm's and MMPretrain's logits from every format, exact slices, the
sampling methods' statistics, calibration, the CLI and bad input."""
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from mmpretrain.registry import MODELS
from safetensors.torch import save_file

import moe_plugin  # noqa: F401
from moe_plugin.recycling import (RecyclingOptions, balanced_choice, calibrate,
                                  load_dense_vit, recycle, recycle_backbone,
                                  save_recycled, select_indices)
from moe_plugin.recycling.calibration import NeuronStatistics
from moe_plugin.recycling.methods import partition_graph

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DIM, DEPTH, HEADS, HIDDEN, CLASSES = 32, 2, 2, 64, 5


def timm_vit(depth=DEPTH, dim=DIM, heads=HEADS, patch=8, seed=0):
    torch.manual_seed(seed)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=patch, embed_dim=dim, depth=depth,
        num_heads=heads, mlp_ratio=HIDDEN / dim, num_classes=CLASSES).eval()
    for param in model.parameters():  # nothing left at its init value
        param.data.normal_(std=0.1)
    return model


def moe_classifier(moe_cfg=None, experts_width=None, **backbone):
    moe_cfg = moe_cfg or dict(type='SparseMoE', num_experts=4, top_k=2,
                              renormalize=True, capacity_factor=4.0,
                              capacity_multiple_of=1)
    arch = dict(embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS,
                feedforward_channels=experts_width or HIDDEN)
    cfg = dict(type='VisionMoE', arch=arch, img_size=32, patch_size=8,
               act='gelu', moe_layers='every-1', moe_cfg=moe_cfg)
    cfg.update(backbone)
    torch.manual_seed(1)
    model = MODELS.build(
        dict(type='MoEImageClassifier', backbone=cfg,
             head=dict(type='LinearClsHead', num_classes=CLASSES,
                       in_channels=DIM))).eval()
    model.init_weights()
    return model


def randomize_routers(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'router' in name:
                param.normal_(std=2.0)


def write_vit_jax_npz(model, path):
    """A timm ViT saved in vit_jax's .npz layout (the one timm reads)."""
    arrays = {}

    def put(name, tensor):
        arrays[name] = tensor.detach().numpy()

    put('embedding/kernel', model.patch_embed.proj.weight.permute(2, 3, 1, 0))
    put('embedding/bias', model.patch_embed.proj.bias)
    put('cls', model.cls_token)
    put('Transformer/posembed_input/pos_embedding', model.pos_embed)
    for i, block in enumerate(model.blocks):
        prefix = f'Transformer/encoderblock_{i}/'
        attn = prefix + 'MultiHeadDotProductAttention_1/'
        head_dim = DIM // HEADS
        for j, name in enumerate(('query', 'key', 'value')):
            weight = block.attn.qkv.weight[j * DIM:(j + 1) * DIM]
            bias = block.attn.qkv.bias[j * DIM:(j + 1) * DIM]
            put(attn + f'{name}/kernel', weight.T.reshape(DIM, HEADS,
                                                          head_dim))
            put(attn + f'{name}/bias', bias.reshape(HEADS, head_dim))
        put(attn + 'out/kernel',
            block.attn.proj.weight.T.reshape(HEADS, head_dim, DIM))
        put(attn + 'out/bias', block.attn.proj.bias)
        for ln, norm in (('LayerNorm_0', block.norm1), ('LayerNorm_2',
                                                        block.norm2)):
            put(prefix + ln + '/scale', norm.weight)
            put(prefix + ln + '/bias', norm.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            put(prefix + f'MlpBlock_3/Dense_{r}/kernel', fc.weight.T)
            put(prefix + f'MlpBlock_3/Dense_{r}/bias', fc.bias)
    put('Transformer/encoder_norm/scale', model.norm.weight)
    put('Transformer/encoder_norm/bias', model.norm.bias)
    put('head/kernel', model.head.weight.T)
    put('head/bias', model.head.bias)
    np.savez(path, **arrays)


@pytest.fixture(scope='module')
def dense_files(tmp_path_factory):
    root = tmp_path_factory.mktemp('dense')
    model = timm_vit()
    state = model.state_dict()
    torch.save(state, root / 'vit.pth')
    torch.save({'model': state}, root / 'vit_wrapped.pth')
    save_file({k: v.contiguous() for k, v in state.items()},
              str(root / 'vit.safetensors'))
    write_vit_jax_npz(model, root / 'vit.npz')
    return model, root


def images(batch=3):
    return torch.randn(batch, 3, 32, 32,
                       generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize('name', ['vit.pth', 'vit_wrapped.pth',
                                  'vit.safetensors', 'vit.npz'])
def test_upcycled_moe_gives_timm_logits(dense_files, name):
    reference, root = dense_files
    dense = load_dense_vit(str(root / name))
    assert dense.fmt == ('big_vision' if name.endswith('.npz') else 'timm')
    model = moe_classifier()
    state, report = recycle(dense, model, method='upcycle')
    model.load_state_dict(state, strict=True)
    randomize_routers(model)  # whatever the router weights
    x = images()
    torch.testing.assert_close(model(x, mode='tensor'), reference(x),
                               rtol=1e-4, atol=1e-5)
    assert model.backbone.layers[0].ffn.moe_metrics[
        'dropped_fraction'] == 0
    assert 'backbone.layers.0.ffn.router.weight' in report['fresh']
    assert 'head.fc.weight' in report['copied']


def test_npz_writer_matches_timms_own_reader(dense_files):
    # The test's .npz layout is the one timm itself loads.
    reference, root = dense_files
    other = timm_vit(seed=5)
    timm.models.vision_transformer._load_weights(other, str(root / 'vit.npz'))
    x = images()
    torch.testing.assert_close(other(x), reference(x), rtol=1e-5, atol=1e-6)


def test_upcycled_moe_gives_mmpretrain_logits(tmp_path):
    torch.manual_seed(3)
    dense_model = MODELS.build(
        dict(type='ImageClassifier',
             backbone=dict(type='VisionTransformer',
                           arch=dict(embed_dims=DIM, num_layers=DEPTH,
                                     num_heads=HEADS,
                                     feedforward_channels=HIDDEN),
                           img_size=32, patch_size=8),
             head=dict(type='LinearClsHead', num_classes=CLASSES,
                       in_channels=DIM))).eval()
    for param in dense_model.parameters():
        param.data.normal_(std=0.1)
    torch.save({'state_dict': dense_model.state_dict(), 'meta': {}},
               tmp_path / 'mmpretrain.pth')
    dense = load_dense_vit(str(tmp_path / 'mmpretrain.pth'))
    assert dense.fmt == 'mmpretrain'
    model = moe_classifier()
    state, _ = recycle(dense, model)
    model.load_state_dict(state, strict=True)
    randomize_routers(model)
    x = images()
    torch.testing.assert_close(model(x, mode='tensor'),
                               dense_model(x, mode='tensor'), rtol=1e-4,
                               atol=1e-5)


def test_without_renormalisation_the_output_is_scaled_by_the_gates(
        dense_files):
    # V-MoE's raw gates: the MLP output is scaled by the sum of the top-K
    # gates, so upcycling is not function preserving (documented).
    reference, root = dense_files
    model = moe_classifier(moe_cfg=dict(type='SparseMoE', num_experts=4,
                                        top_k=2, capacity_factor=4.0))
    model.load_state_dict(recycle(load_dense_vit(str(root / 'vit.pth')),
                                  model)[0])
    randomize_routers(model)
    x = images()
    assert not torch.allclose(model(x, mode='tensor'), reference(x),
                              atol=1e-3)


@pytest.mark.parametrize('method', ['random', 'uniform'])
def test_sampled_experts_are_exact_slices(dense_files, method):
    _, root = dense_files
    dense = load_dense_vit(str(root / 'vit.pth'))
    model = moe_classifier(experts_width=16)
    # The dense blocks of the target are narrower too: only MoE blocks.
    state, report = recycle_backbone(dense, model.backbone, method=method,
                                     seed=4)
    for i in range(DEPTH):
        fc1_w, fc1_b, fc2_w, fc2_b = dense.fc(i)
        indices = report['experts'][f'layers.{i}']['experts']
        assert len(indices) == 4 and all(len(e) == 16 for e in indices)
        for e, idx in enumerate(indices):
            assert len(set(idx)) == 16
            assert torch.equal(state[f'layers.{i}.ffn.experts.w1'][e],
                               fc1_w[idx].T)
            assert torch.equal(state[f'layers.{i}.ffn.experts.b1'][e],
                               fc1_b[idx])
            assert torch.equal(state[f'layers.{i}.ffn.experts.w2'][e],
                               fc2_w[:, idx].T)
            assert torch.equal(state[f'layers.{i}.ffn.experts.b2'][e], fc2_b)
        if method == 'uniform':
            assert all(idx == indices[0] for idx in indices)
        else:
            assert len({tuple(idx) for idx in indices}) == 4


def test_importance_sampling_prefers_important_neurons():
    rng = np.random.default_rng(0)
    scores = np.full(64, 0.1)
    scores[:8] = 10.0
    stats = dict(l2=scores, l1=scores, freq=scores)
    indices = select_indices(RecyclingOptions('importance'), 64, 8, 200, rng,
                             stats)
    share = np.isin(indices, np.arange(8)).mean()
    # P(first draw important) = 80 / 85.6; without replacement it stays
    # high. Uniform sampling would give 8 / 64 = 0.125.
    assert share > 0.8
    top = select_indices(RecyclingOptions('importance', selection='top'),
                         64, 8, 3, rng, stats)
    assert (top == np.arange(8)).all()


@pytest.mark.parametrize('algorithm', ['louvain', 'spectral'])
def test_graph_partitioning_recovers_a_planted_partition(algorithm):
    pytest.importorskip('networkx' if algorithm == 'louvain' else 'sklearn')
    rng = np.random.default_rng(0)
    groups = rng.permutation(16).reshape(4, 4)
    coactivation = np.full((16, 16), 0.01)
    for group in groups:
        coactivation[np.ix_(group, group)] = 1.0
    labels = partition_graph(coactivation, 4, algorithm, seed=0)
    found = {frozenset(np.flatnonzero(labels == k)) for k in range(4)}
    assert found == {frozenset(g) for g in groups}
    stats = dict(l2=np.ones(16), coactivation=coactivation)
    indices = select_indices(RecyclingOptions('graph', graph=algorithm), 16,
                             4, 4, rng, stats)
    assert {frozenset(e) for e in indices.tolist()} == found


def test_calibration_statistics_and_bounded_memory():
    from mmpretrain.models import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(
        arch=dict(embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS,
                  feedforward_channels=HIDDEN), img_size=32, patch_size=8)
    seen = []
    model.layers[1].ffn.layers[0].register_forward_hook(
        lambda m, a, out: seen.append(out.detach().reshape(-1, HIDDEN)))
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    stats = calibrate(model, iter(batches), [1], coactivation=True)[1]
    acts = torch.cat(seen).double()
    np.testing.assert_allclose(stats['l1'], acts.abs().mean(0).numpy())
    np.testing.assert_allclose(stats['l2'],
                               acts.square().mean(0).sqrt().numpy())
    on = (acts > 0).double()
    np.testing.assert_allclose(stats['freq'], on.mean(0).numpy())
    np.testing.assert_allclose(stats['coactivation'],
                               (on.T @ on / len(on)).numpy())
    # Running sums only: the same bytes for 8 tokens or 8 million.
    small, large = NeuronStatistics(HIDDEN, True), NeuronStatistics(
        HIDDEN, True)
    small.update(torch.randn(8, HIDDEN))
    for _ in range(50):
        large.update(torch.randn(1000, HIDDEN))
    assert small.nbytes == large.nbytes == 8 * (3 * HIDDEN + HIDDEN**2)


def test_balanced_choice_covers_every_class_and_is_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    chosen = balanced_choice(labels, 12, seed=3)
    assert sorted(np.bincount(np.asarray(labels)[chosen])) == [4, 4, 4]
    assert chosen == balanced_choice(labels, 12, seed=3)
    assert chosen != balanced_choice(labels, 12, seed=4)
    with pytest.raises(ValueError, match='has 3 classes, fewer than the '
                       '10 asked for'):
        balanced_choice(labels, 12, seed=3, num_classes=10)


def test_dual_path_target_takes_core_and_universal_subsets(dense_files):
    _, root = dense_files
    dense = load_dense_vit(str(root / 'vit.pth'))
    model = moe_classifier(moe_cfg=dict(type='SpheroMoE', num_experts=2,
                                        num_universal_experts=4,
                                        univ_factor=0.25))
    state, report = recycle(dense, model, method='random', seed=1)
    model.load_state_dict(state, strict=True)
    block = report['experts']['layers.0']
    assert np.shape(block['core']) == (2, HIDDEN)
    assert np.shape(block['universal']) == (4, HIDDEN // 4)
    for key in ('backbone.layers.0.ffn.phi', 'backbone.layers.0.ffn.scales.0'):
        assert key in report['fresh']


def test_config_only_upcycling(dense_files):
    reference, root = dense_files
    model = moe_classifier(
        init_cfg=dict(type='RecycleDenseInit',
                      checkpoint=str(root / 'vit.pth')))
    randomize_routers(model)
    x = images()
    features = model.backbone(x)[0]
    expected = reference.forward_head(reference.forward_features(x),
                                      pre_logits=True)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='needs calibration images'):
        moe_classifier(init_cfg=dict(type='RecycleDenseInit',
                                     checkpoint='x.pth',
                                     method='importance'))


@pytest.mark.parametrize('kwargs,match', [
    (dict(depth=3), 'dense checkpoint has 3 blocks, the target model 2'),
    (dict(dim=16, heads=2), r'patch_embed.projection.weight: checkpoint '
     r'\(16, 3, 8, 8\) vs model \(32, 3, 8, 8\) \(width mismatch\)'),
    (dict(patch=4), r'\(32, 3, 4, 4\) vs model \(32, 3, 8, 8\) \(patch '
     'size mismatch\\)'),
])
def test_mismatched_dense_models_are_rejected(tmp_path, kwargs, match):
    torch.save(timm_vit(**kwargs).state_dict(), tmp_path / 'other.pth')
    with pytest.raises(ValueError, match=match):
        recycle(load_dense_vit(str(tmp_path / 'other.pth')),
                moe_classifier())


def test_heads_mismatch_from_npz(tmp_path):
    model = timm_vit()
    write_vit_jax_npz(model, tmp_path / 'vit.npz')
    target = moe_classifier(arch=dict(embed_dims=DIM, num_layers=DEPTH,
                                      num_heads=4,
                                      feedforward_channels=HIDDEN))
    with pytest.raises(ValueError, match='2 attention heads, the target '
                       'model 4'):
        recycle(load_dense_vit(str(tmp_path / 'vit.npz')), target)


def test_corrupt_truncated_and_unknown_inputs(dense_files, tmp_path):
    _, root = dense_files
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint' * 10)
    data = (root / 'vit.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'bad.safetensors').write_bytes(b'\x00' * 40)
    for name in ('garbage.pth', 'truncated.pth', 'bad.safetensors'):
        with pytest.raises(ValueError, match='corrupt or truncated'):
            load_dense_vit(str(tmp_path / name))
    with pytest.raises(ValueError, match="unknown dense format 'jax'"):
        load_dense_vit(str(root / 'vit.pth'), 'jax')
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_dense_vit(str(tmp_path / 'missing.pth'))
    dense = load_dense_vit(str(root / 'vit.pth'))
    with pytest.raises(ValueError, match="unknown method 'copy'"):
        recycle(dense, moe_classifier(), method='copy')
    with pytest.raises(ValueError, match="'upcycle' copies the dense MLP"):
        recycle(dense, moe_classifier(experts_width=16))
    with pytest.raises(ValueError, match='needs calibration statistics'):
        recycle(dense, moe_classifier(), method='importance')


def test_outputs_never_overwritten_and_never_partial(
        dense_files, tmp_path, monkeypatch):
    _, root = dense_files
    model = moe_classifier()
    state, report = recycle(load_dense_vit(str(root / 'vit.pth')), model)
    out = str(tmp_path / 'w.pth')
    weights, report_path = save_recycled(state, report, out)
    before = os.stat(weights).st_mtime_ns
    with pytest.raises(FileExistsError, match='pass --force'):
        save_recycled(state, report, out)
    assert os.stat(weights).st_mtime_ns == before
    # A failure half-way through writing leaves no partial file behind.

    def disk_full(obj, path):
        with open(path, 'wb') as f:
            f.write(b'half a checkpoint')
        raise OSError('No space left on device')

    with monkeypatch.context() as patch:
        patch.setattr(torch, 'save', disk_full)
        with pytest.raises(OSError, match='No space left'):
            save_recycled(state, report, str(tmp_path / 'x.pth'))
        with pytest.raises(OSError, match='No space left'):
            save_recycled(state, report, out, force=True)
    assert sorted(os.listdir(tmp_path)) == ['w.json', 'w.pth']
    assert os.stat(weights).st_mtime_ns == before
    loaded = torch.load(weights, weights_only=True)['state_dict']
    model.load_state_dict(loaded, strict=True)
    assert json.loads(open(report_path).read())['fresh']


def write_image_folder(root, size=32, classes=3, per_class=6):
    from PIL import Image
    rng = np.random.RandomState(0)
    for c in range(classes):
        os.makedirs(osp.join(root, f'c{c}'), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 256, (size, size, 3)).astype(
                np.uint8)).save(osp.join(root, f'c{c}', f'{i}.png'))
    return root


TARGET_CONFIG = """
model = dict(
    type='MoEImageClassifier',
    backbone=dict(type='VisionMoE', arch=dict(embed_dims=32, num_layers=2,
                  num_heads=2, feedforward_channels=16), img_size=32,
                  patch_size=8, act='gelu', moe_layers='every-1',
                  moe_cfg=dict(type='SparseMoE', num_experts=4, top_k=2)),
    head=dict(type='LinearClsHead', num_classes=3, in_channels=32))
data_preprocessor = dict(num_classes=3, mean=[127.5] * 3, std=[127.5] * 3)
"""


def test_cli_importance_with_calibration_folder(dense_files, tmp_path):
    _, root = dense_files
    folder = write_image_folder(str(tmp_path / 'calib'))
    config = tmp_path / 'target.py'
    config.write_text(TARGET_CONFIG)
    out = tmp_path / 'out' / 'moe.pth'
    command = [
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'gen_weight', 'gen_vit_moe_weight.py'),
        str(config), '--dense', str(root / 'vit.npz'), '--method',
        'importance', '--calib-data', folder, '--num-calib-images', '9',
        '--calib-classes', '3', '--out', str(out)
    ]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'big_vision' in proc.stdout and 'sampled' in proc.stdout
    report = json.loads((tmp_path / 'out' / 'moe.json').read_text())
    assert report['method'] == 'importance' and report['format'] == \
        'big_vision' and report['num_calib_images'] == 9
    assert len(report['sha256']) == 64
    assert np.shape(report['experts']['layers.1']['experts']) == (4, 16)
    assert 'head.fc.weight' in report['fresh']  # 5 classes vs 3
    state = torch.load(out, weights_only=True)['state_dict']
    experts = state['backbone.layers.1.ffn.experts.w1']
    dense = load_dense_vit(str(root / 'vit.npz'))
    idx = report['experts']['layers.1']['experts'][2]
    assert torch.equal(experts[2], dense.fc(1)[0][idx].T)
    # Again without --force: refused, the output untouched.
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=1800)
    assert again.returncode != 0 and 'pass --force' in again.stderr
    assert torch.equal(
        torch.load(out, weights_only=True)['state_dict'][
            'backbone.layers.1.ffn.experts.w1'], experts)
    # With --force, the same seed gives the same weights, fresh ones too.
    forced = subprocess.run(command + ['--force'], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=1800)
    assert forced.returncode == 0, forced.stderr[-3000:]
    again_state = torch.load(out, weights_only=True)['state_dict']
    for key in ('backbone.layers.1.ffn.router.weight', 'head.fc.weight',
                'backbone.layers.1.ffn.experts.w1'):
        assert torch.equal(again_state[key], state[key]), key
    # Asking for more classes than the folder has.
    fewer = subprocess.run(command[:-4] + ['--calib-classes', '5', '--out',
                                           str(tmp_path / 'x.pth')],
                           cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=1800)
    assert 'has 3 classes, fewer than the 5 asked for' in fewer.stderr
    assert not osp.exists(tmp_path / 'x.pth')


def test_calibration_from_a_dataset_config(tmp_path):
    from moe_plugin.recycling.calibration import dataset_config_batches
    root = tmp_path / 'data'
    write_image_folder(str(root / 'train'), per_class=5)
    config = tmp_path / 'data_cfg.py'
    config.write_text(f"""
pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(dataset=dict(
    type='CustomDataset', data_root={str(root)!r}, data_prefix='train',
    pipeline=[dict(type='LoadImageFromFile'),
              dict(type='RandomFlip', prob=1.0), dict(type='PackInputs')]))
test_dataloader = dict(dataset=dict(pipeline=pipeline))
data_preprocessor = dict(mean=[127.5] * 3, std=[127.5] * 3, to_rgb=True)
""")
    batches, count = dataset_config_batches(str(config), 6, seed=0,
                                            num_classes=3, batch_size=4)
    shapes = [b.shape for b in batches]
    assert count == 6 and shapes == [(4, 3, 32, 32), (2, 3, 32, 32)]
    with pytest.raises(ValueError, match='fewer than the 4 asked for'):
        dataset_config_batches(str(config), 6, seed=0, num_classes=4)


def test_louvain_on_a_large_graph_keeps_the_planted_groups():
    pytest.importorskip('networkx')
    from moe_plugin.recycling.methods import NEIGHBOURS
    rng = np.random.default_rng(1)
    hidden, parts = 4 * NEIGHBOURS * 2, 4
    groups = rng.permutation(hidden).reshape(parts, -1)
    coactivation = rng.uniform(0, 0.05, (hidden, hidden))
    coactivation = (coactivation + coactivation.T) / 2
    for group in groups:
        coactivation[np.ix_(group, group)] += 1.0
    labels = partition_graph(coactivation, parts, 'louvain', seed=0)
    found = {frozenset(np.flatnonzero(labels == k)) for k in range(parts)}
    assert found == {frozenset(g) for g in groups}


def test_position_embedding_resized_to_the_target_grid(dense_files):
    from mmpretrain.models.utils import resize_pos_embed
    _, root = dense_files
    dense = load_dense_vit(str(root / 'vit.pth'))
    model = moe_classifier(img_size=64)
    state, report = recycle(dense, model)
    model.load_state_dict(state, strict=True)
    assert state['backbone.pos_embed'].shape == (1, 1 + 8 * 8, DIM)
    torch.testing.assert_close(
        state['backbone.pos_embed'],
        resize_pos_embed(dense.state['pos_embed'], (4, 4), (8, 8), 'bicubic',
                         1))
    # The class token's position is kept as it is.
    torch.testing.assert_close(state['backbone.pos_embed'][:, 0],
                               dense.state['pos_embed'][:, 0])
    assert 'backbone.pos_embed' in report['copied']
