"""capacity_sweep.py: the processed fraction is the capacity arithmetic."""
import csv
import json

import pytest
import torch
from PIL import Image

from moe_plugin.analysis.sweep import capacity_sweep, check_sweep
from moe_plugin.models import VisionMoE

from .helpers import load_tool

# 25 tokens per image (one group), E = 4. Each choice rank sends all 25
# tokens of an image to one expert (first: the colour's, second: expert 3),
# which keeps B of them: processed = min(B, 25) / 25 with
# B = ceil(25 * K * c / 4) rounded up to a multiple of 4.
EXPECTED = {
    (1, 0.5): 4 / 25,    # 3.125 -> 4
    (1, 1.0): 8 / 25,    # 6.25 -> 7 -> 8
    (1, 2.0): 16 / 25,   # 12.5 -> 13 -> 16
    (1, 4.0): 1.0,       # 25 -> 28
    (2, 0.5): 8 / 25,    # 6.25 -> 7 -> 8 per choice rank
    (2, 1.0): 16 / 25,   # 12.5 -> 13 -> 16
    (2, 2.0): 1.0,       # 25 -> 28
    (2, 4.0): 1.0,
}


def test_sweep_processed_fraction_is_capacity_arithmetic(hand_routed,
                                                         tmp_path, capsys):
    config, checkpoint, _ = hand_routed
    sweep = load_tool('capacity_sweep')
    out = tmp_path / 'sweep'
    rows = sweep.main([
        config, checkpoint, '--capacity', '0.5', '1', '2', '4', '--top-k',
        '1', '2', '--bpr', 'both', '--out',
        str(out)
    ])
    assert len(rows) == 16
    saved = json.loads((out / 'capacity_sweep.json').read_text())['rows']
    for row in saved:
        key = (row['top_k'], row['capacity_factor'])
        assert row['processed_fraction'] == pytest.approx(EXPECTED[key]), row
        assert row['layers'] == {'layers.0.ffn': pytest.approx(EXPECTED[key])}
        assert row['images'] == 6
        assert 0.0 <= row['top1'] <= 100.0
    assert {(r['top_k'], r['batch_priority']) for r in saved} == {
        (1, False), (1, True), (2, False), (2, True)}
    with open(out / 'capacity_sweep.csv') as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == [
        'capacity_factor', 'top_k', 'batch_priority', 'top1',
        'processed_fraction', 'images', 'processed/layers.0.ffn'
    ]
    assert [float(r['processed_fraction']) for r in table] == pytest.approx(
        [r['processed_fraction'] for r in saved])
    with Image.open(out / 'capacity_sweep.png') as png:
        assert png.size[0] > 300 and png.size[1] > 200
    # Nothing is overwritten without --force.
    with pytest.raises(FileExistsError, match='--force'):
        sweep.main([config, checkpoint, '--capacity', '1', '--out',
                    str(out)])
    sweep.main([config, checkpoint, '--capacity', '1', '--out', str(out),
                '--force'])


@pytest.mark.parametrize('value', ['0', '-1', 'nan', 'inf', 'x'])
def test_cli_rejects_capacity_not_positive(hand_routed, tmp_path, value,
                                           capsys):
    config, checkpoint, _ = hand_routed
    with pytest.raises(SystemExit):
        load_tool('capacity_sweep').main(
            [config, checkpoint, '--capacity', value, '--out',
             str(tmp_path)])
    assert 'capacity factor must be a number > 0' in capsys.readouterr().err


def tiny(moe_cfg):
    model = VisionMoE(
        arch=dict(embed_dims=8, num_layers=2, num_heads=2,
                  feedforward_channels=16),
        img_size=8, patch_size=4, moe_layers=[1], moe_cfg=moe_cfg)
    model.eval()
    return model


def test_library_checks_and_restores_routing():
    model = tiny(dict(type='SparseMoE', num_experts=4, top_k=2,
                      eval_capacity_factor=3.0))
    with pytest.raises(ValueError, match='> 0, got 0'):
        check_sweep(model, [1.0, 0], [None])
    with pytest.raises(ValueError, match='top-k 5'):
        check_sweep(model, [1.0], [5])
    with pytest.raises(ValueError, match='SparseMoE'):
        check_sweep(tiny(dict(type='SoftMoE', num_experts=4)), [1.0], [None])
    batches = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    rows = capacity_sweep(model, lambda: batches, [0.5], [1], [True])
    assert (rows[0]['top_k'], rows[0]['capacity_factor'],
            rows[0]['batch_priority']) == (1, 0.5, True)
    layer = model.layers[1].ffn
    assert (layer.eval_top_k, layer.eval_capacity_factor,
            layer.eval_batch_priority) == (2, 3.0, False)


def test_processed_fraction_counts_every_choice_rank(hand_routed):
    """A group of a red and a green image: the first choices split over
    experts 0 and 1 (25 tokens each, all kept), the second choices all go to
    expert 3, which keeps B = ceil(50 * 2 * 1 / 4) = 25 -> 28 of 50: 78 of
    the 100 (token, choice) pairs, not 2 x the first rank's 50."""
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    from moe_plugin.analysis.sweep import evaluate_routing
    from moe_plugin.layers import set_eval_routing

    from .conftest import set_hand_routing
    config, _, _ = hand_routed
    model = set_hand_routing(MODELS.build(Config.fromfile(config).model))
    model.eval()
    set_eval_routing(model, top_k=2, capacity_factor=1.0, group_size=2)
    images = -torch.ones(2, 3, 20, 20)
    images[0, 0] = images[1, 1] = 1.0  # red, green after normalisation
    result = evaluate_routing(model, [(images, torch.tensor([0, 1]))])
    assert result['processed_fraction'] == pytest.approx(78 / 100)
