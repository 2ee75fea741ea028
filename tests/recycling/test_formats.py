"""The big_vision reader on a trunk whose MoE blocks hold no MLP."""
import numpy as np
import pytest
import torch
from test_recycling import timm_vit, write_vit_jax_npz

from moe_plugin.recycling.formats import big_vision_to_canonical


def test_blocks_without_mlp_are_read_without_one(tmp_path):
    write_vit_jax_npz(timm_vit(), tmp_path / 'vit.npz')
    arrays = dict(np.load(tmp_path / 'vit.npz'))
    full = big_vision_to_canonical(arrays)
    trunk = {k: v for k, v in arrays.items()
             if not k.startswith('Transformer/encoderblock_1/MlpBlock_3/')}
    with pytest.raises(ValueError, match='encoderblock_1/MlpBlock_3'):
        big_vision_to_canonical(trunk)
    dense = big_vision_to_canonical(trunk, blocks_without_mlp=(1, ))
    expected = {k: v for k, v in full.state.items()
                if not k.startswith('layers.1.ffn.')}
    assert list(dense.state) == list(expected)
    assert all(torch.equal(dense.state[k], v) for k, v in expected.items())
    assert dense.num_layers == 2 and dense.num_heads == full.num_heads
    assert torch.equal(dense.head['weight'], full.head['weight'])
