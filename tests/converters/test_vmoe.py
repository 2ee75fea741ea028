"""V-MoE checkpoints: every tensor in its place, converted logits against
V-MoE's equations (``vmoe_writer.vmoe_forward``), the CLI and bad input
(the reader's own round trips: ``test_vmoe_checkpoint.py``)."""
import os
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmpretrain.registry import MODELS

import moe_plugin  # noqa: F401
from moe_plugin.cli import EXPECTED_ERRORS
from moe_plugin.converters.vmoe import convert_vmoe, vmoe_to_mmpretrain
from moe_plugin.converters.vmoe_checkpoint import read_vmoe_checkpoint

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from vmoe_writer import (BF16, SPARSE, SPLIT, make_params,  # noqa: E402
                         vmoe_forward, write)

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(REPO_ROOT, 'tools', 'model_converters'))
import vmoe_to_mmpretrain as vmoe_cli  # noqa: E402


def converted_model(prefix, **routing):
    state, model_cfg, arch = convert_vmoe(prefix, **routing)
    model = MODELS.build(model_cfg)
    model.load_state_dict(state, strict=True)
    return model.eval(), arch


def images(n, size=16, seed=0):
    return torch.randn(n, 3, size, size,
                       generator=torch.Generator().manual_seed(seed))


def test_every_tensor_lands_in_its_place(tmp_path):
    params = make_params(2, **SPARSE)
    prefix, expected = write(tmp_path, params, bf16=BF16, split=SPLIT)
    state, arch = vmoe_to_mmpretrain(read_vmoe_checkpoint(prefix))
    p = {k: torch.from_numpy(v) for k, v in expected.items()}
    assert arch.num_layers == 12 and arch.moe_layers == (2, 10, 11)
    assert (arch.embed_dims, arch.num_heads, arch.patch_size,
            arch.img_size) == (32, 2, 4, 16)
    b = 'Encoder/encoderblock_10/'
    checks = {
        'backbone.layers.10.ffn.router.weight':
        p[b + 'Moe/Router/dense/kernel'].T,
        'backbone.layers.10.ffn.experts.w1': p[b + 'Moe/Mlp/Dense_0/kernel'],
        'backbone.layers.10.ffn.experts.b2': p[b + 'Moe/Mlp/Dense_1/bias'],
        'backbone.layers.10.attn.qkv.weight': torch.cat([
            p[b + f'SelfAttention/{n}/kernel'].reshape(32, 32).T
            for n in ('query', 'key', 'value')
        ]),
        'backbone.layers.10.attn.proj.weight':
        p[b + 'SelfAttention/out/kernel'].reshape(32, 32).T,
        'backbone.layers.10.ln2.weight': p[b + 'LayerNorm_1/scale'],
        'backbone.layers.3.ffn.layers.1.weight':
        p['Encoder/encoderblock_3/Mlp/Dense_1/kernel'].T,
        'backbone.patch_embed.projection.weight':
        p['embedding/kernel'].permute(3, 2, 0, 1),
        'backbone.pos_embed': p['Encoder/posembed_input/pos_embedding'],
        'backbone.cls_token': p['cls'],
        'backbone.ln1.bias': p['Encoder/encoder_norm/bias'],
        'head.layers.head.weight': p['head/kernel'].T,
    }
    for key, value in checks.items():
        assert torch.equal(state[key], value), key
    # Every source value is used exactly once (sizes add up).
    assert sum(v.numel() for v in state.values()) == sum(
        v.size for v in expected.values())


def test_sparse_model_with_drops_and_bpr_matches_vmoe(tmp_path):
    params = make_params(3, **SPARSE)
    prefix, expected = write(tmp_path, params, bf16=BF16, split=SPLIT)
    routing = dict(top_k=2, capacity_factor=0.5, eval_capacity_factor=0.5,
                   batch_priority=True, group_size=2, eval_group_size=2)
    model, _ = converted_model(prefix, **routing)
    x = images(4)
    logits = model(x, mode='tensor')
    reference = vmoe_forward(expected, x, top_k=2, capacity_factor=0.5,
                             group_images=2, bpr=True)
    torch.testing.assert_close(logits.double(), reference, rtol=1e-4,
                               atol=1e-4)
    # Drops happened: 34 tokens x 2 choices for 4 experts of 12 slots.
    dropped = [m.moe_metrics['dropped_fraction'].item()
               for _, m in model.moe_modules]
    assert min(dropped) > 0.2
    # Routing groups of two images: an image's logits depend on its
    # neighbour, and the reference says the same.
    swapped = model(x[[0, 2, 1, 3]], mode='tensor')[0]
    assert not torch.allclose(swapped, logits[0], atol=1e-4)
    torch.testing.assert_close(
        swapped.double(),
        vmoe_forward(expected, x[[0, 2, 1, 3]], 2, 0.5, 2, True)[0],
        rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('case', ['gap', 'pre_logits', 'soft_map'])
def test_other_models_match_vmoe(tmp_path, case):
    kwargs = dict(
        gap=dict(classifier='gap'),
        pre_logits=dict(classifier='token', representation=24),
        soft_map=dict(classifier='map', kind='soft', moe_blocks=(2, 3)),
    )[case]
    params = make_params(4, **kwargs)
    prefix, expected = write(tmp_path, params, bf16=BF16[2:], split=SPLIT)
    routing = dict(top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0,
                   group_size=2, eval_group_size=2)
    model, arch = converted_model(prefix, **routing)
    assert arch.classifier == kwargs['classifier']
    x = images(4, seed=1)
    reference = vmoe_forward(expected, x, top_k=1, capacity_factor=1.0,
                             group_images=2)
    torch.testing.assert_close(
        model(x, mode='tensor').double(), reference, rtol=1e-4, atol=1e-4)


def test_cli_writes_weights_and_a_complete_config(tmp_path, capsys):
    params = make_params(5, depth=4, moe_blocks=(1, 3), representation=16)
    prefix, expected = write(tmp_path, params)
    out, cfg_path = str(tmp_path / 'out.pth'), str(tmp_path / 'cfg.py')
    vmoe_cli.main([
        prefix, out, '--config-out', cfg_path, '--eval-capacity-factor',
        '2.0'
    ])
    cfg = Config.fromfile(cfg_path)
    assert cfg.model.backbone.moe_cfg.eval_capacity_factor == 2.0
    assert cfg.model.backbone.moe_cfg.top_k == 2  # V-MoE's default
    assert cfg.test_dataloader.dataset.type == 'ImageNet'
    assert 'V-MoE' in open(cfg_path).read().split('\n')[0]
    model = MODELS.build(cfg.model)
    state = torch.load(out, map_location='cpu', weights_only=True)
    model.load_state_dict(state['state_dict'], strict=True)
    x = images(2, seed=2)
    torch.testing.assert_close(
        model.eval()(x, mode='tensor').double(),
        vmoe_forward(expected, x, 2, 2.0, 1), rtol=1e-4, atol=1e-4)
    # An existing output is kept; --force replaces it.
    before = os.path.getmtime(out)
    with pytest.raises(EXPECTED_ERRORS, match='exists'):
        vmoe_cli.main([prefix, out])
    assert os.path.getmtime(out) == before
    vmoe_cli.main([prefix, out, '--force'])


def _cli_fails(prefix, tmp_path, match):
    out, cfg_path = str(tmp_path / 'o.pth'), str(tmp_path / 'o.py')
    with pytest.raises(EXPECTED_ERRORS, match=match):
        vmoe_cli.main([prefix, out, '--config-out', cfg_path])
    assert not osp.exists(out) and not osp.exists(cfg_path)
    assert not [f for f in os.listdir(tmp_path) if '.part' in f]


def test_truncated_shard(tmp_path):
    prefix, _ = write(tmp_path, make_params(6, depth=2, moe_blocks=(1, )))
    shard = prefix + '.data-00001-of-00002'
    data = open(shard, 'rb').read()
    with open(shard, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(ValueError, match='truncated'):
        read_vmoe_checkpoint(prefix)
    _cli_fails(prefix, tmp_path, 'data-00001-of-00002')


def test_missing_shard(tmp_path):
    prefix, _ = write(tmp_path, make_params(6, depth=2, moe_blocks=(1, )))
    os.remove(prefix + '.data-00000-of-00002')
    with pytest.raises(FileNotFoundError, match='data-00000-of-00002'):
        read_vmoe_checkpoint(prefix)
    _cli_fails(prefix, tmp_path, 'do not exist')


def test_index_names_a_shard_that_is_not_there(tmp_path):
    # Three shards in the index, two written: leaves of shard 2 are lost.
    prefix, _ = write(tmp_path, make_params(6, depth=2, moe_blocks=(1, )),
                      num_shards=3, shard_count=3)
    os.remove(prefix + '.data-00002-of-00003')
    _cli_fails(prefix, tmp_path, 'data-00002-of-00003')
    # A shard number beyond the shard count.
    prefix, _ = write(tmp_path, make_params(6, depth=2, moe_blocks=(1, )),
                      name='bad', num_shards=2, shard_count=1)
    with pytest.raises(ValueError, match='in shard 1, but the checkpoint '
                       'has 1 shards'):
        read_vmoe_checkpoint(prefix)
    # A piece the index names but its shard does not hold.
    prefix, _ = write(tmp_path, make_params(6, depth=2, moe_blocks=(1, )),
                      name='empty')
    with open(prefix + '.data-00001-of-00002', 'wb') as f:
        import msgpack
        f.write(msgpack.packb({'__msgpack_array_chunk_a87ca2__': True}))
    _cli_fails(prefix, tmp_path, 'not in their shards')


def test_unknown_architecture(tmp_path):
    params = make_params(7, depth=2, moe_blocks=(1, ))
    params['Encoder/encoderblock_0/SelfAttention/query_ln/scale'] = \
        np.ones(32, np.float32)
    prefix, _ = write(tmp_path, params)
    _cli_fails(prefix, tmp_path, 'query_ln/scale')
    params = make_params(7, depth=2, moe_blocks=(1, ))
    del params['embedding/kernel']
    prefix, _ = write(tmp_path, params, name='noembed')
    _cli_fails(prefix, tmp_path, 'unknown architecture')
    # E3 (ensembles of experts): the router kernel is (D, M, E / M).
    params = make_params(7, depth=2, moe_blocks=(1, ))
    params['Encoder/encoderblock_1/Moe/Router/dense/kernel'] = np.zeros(
        (32, 2, 2), np.float32)
    prefix, _ = write(tmp_path, params, name='eee')
    _cli_fails(prefix, tmp_path, 'E3 ensemble')


def test_converted_config_evaluates_with_tools_test(tmp_path,
                                                    tiny_image_folder):
    """tools/test.py on the written config gives V-MoE's predictions."""
    import pickle
    import subprocess

    from PIL import Image
    params = make_params(8, depth=2, moe_blocks=(1, ))
    prefix, expected = write(tmp_path, params)
    out, cfg_path = str(tmp_path / 'w.pth'), str(tmp_path / 'converted.py')
    vmoe_cli.main([prefix, out, '--config-out', cfg_path,
                   '--eval-capacity-factor', '0.5'])
    local = tmp_path / 'local.py'
    local.write_text(
        f'_base_ = [{cfg_path!r}]\n'
        'test_dataloader = dict(batch_size=4, num_workers=0, dataset=dict('
        f"_delete_=True, type='CustomDataset', data_root="
        f"{tiny_image_folder!r}, data_prefix='val', "
        "pipeline={{_base_.test_dataloader.dataset.pipeline}}))\n")
    preds = tmp_path / 'preds.pkl'
    proc = subprocess.run([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'test.py'),
        str(local), out, '--work-dir',
        str(tmp_path / 'work'), '--out',
        str(preds), '--eval-group-size', '2'
    ], cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:]
    with open(preds, 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 8
    # V-MoE on the same images: RGB scaled to [-1, 1], groups of 2 images
    # in the order the (unshuffled) loader batches them.
    paths = [r['img_path'] for r in results]
    batch = torch.stack([
        torch.from_numpy(np.asarray(Image.open(p).convert('RGB'),
                                    np.float32)).permute(2, 0, 1)
        for p in paths
    ]) / 127.5 - 1
    reference = vmoe_forward(expected, batch, 2, 0.5, 2).softmax(-1)
    for result, score in zip(results, reference):
        torch.testing.assert_close(result['pred_score'].double(), score,
                                   rtol=1e-4, atol=1e-5)
