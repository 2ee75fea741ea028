"""The V-MoE checkpoint reader: round trips through a writer of vmoe's
format (``vmoe_writer``), pieces and shards in every arrangement."""
import os.path as osp
import sys

import numpy as np
import pytest

from moe_plugin.converters.vmoe_checkpoint import read_vmoe_checkpoint

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from vmoe_writer import BF16, SPARSE, SPLIT, make_params, write  # noqa: E402


def test_reader_round_trip_two_shards_split_bf16(tmp_path):
    params = make_params(0, **SPARSE)
    prefix, expected = write(tmp_path, params, bf16=BF16, split=SPLIT)
    assert osp.isfile(prefix + '.data-00001-of-00002')
    read = read_vmoe_checkpoint(prefix)
    assert sorted(read) == sorted(params)
    for name, value in expected.items():
        assert read[name].dtype == np.float32
        assert np.array_equal(read[name], value), name
    # bfloat16 leaves really were rounded, the others not.
    name = BF16[0]
    assert not np.array_equal(read[name], params[name])
    assert np.array_equal(read[SPLIT[0]], params[SPLIT[0]])


def test_reader_takes_every_piece_of_a_leaf_in_one_shard(tmp_path):
    # Three pieces in two shards: shard 0 holds pieces 0 and 2 of each leaf.
    params = make_params(0, **SPARSE)
    prefix, expected = write(tmp_path, params, split=SPLIT, split_pieces=3)
    read = read_vmoe_checkpoint(prefix)
    for name in SPLIT:
        assert params[name].shape[0] >= 3
        assert np.array_equal(read[name], expected[name]), name


def test_reader_old_index_without_version_and_more_shards(tmp_path):
    params = make_params(1, depth=2, moe_blocks=(1, ))
    prefix, expected = write(tmp_path, params, num_shards=5, version=False,
                             subchunk=3)
    read = read_vmoe_checkpoint(prefix)
    assert all(np.array_equal(read[k], v) for k, v in expected.items())


def test_reader_needs_the_index(tmp_path):
    with pytest.raises(FileNotFoundError, match='index'):
        read_vmoe_checkpoint(str(tmp_path / 'nothing'))
