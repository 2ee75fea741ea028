"""routing_heatmap.py recovers a routing set by hand."""
import numpy as np
import pytest
import torch
from PIL import Image

from moe_plugin.analysis.heatmap import ClassExpertAccumulator
from moe_plugin.analysis.plots import structure_order
from moe_plugin.analysis.recording import LayerRouting

from .conftest import CLASSES, hand_gates
from .helpers import load_tool


def test_heatmap_recovers_the_hand_set_assignment(hand_routed, tmp_path):
    config, checkpoint, _ = hand_routed
    out = tmp_path / 'heat'
    load_tool('routing_heatmap').main(
        [config, checkpoint, '--out', str(out)])
    data = np.load(out / 'routing_heatmap.npz')
    assert list(data['classes']) == list(CLASSES)
    assert list(data['layers']) == ['layers.0.ffn']
    assert list(data['images']) == [2, 2, 2]
    # K = 1, capacity 4: every token of class k goes to expert k with
    # weight g (the hand-computed gate); nobody uses expert 3.
    gates = hand_gates().numpy()
    expected = np.zeros((3, 4))
    expected[np.arange(3), np.arange(3)] = gates[0]
    np.testing.assert_allclose(data['layers.0.ffn/weights'], expected,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(data['layers.0.ffn/taken'],
                                  (expected > 0).astype(float))
    np.testing.assert_array_equal(data['layers.0.ffn/dropped'],
                                  np.zeros((3, 4)))
    # The clean gates: class k's gate vector is the red one with
    # channels 0 and k swapped.
    probs = data['layers.0.ffn/probs']
    for k in range(3):
        vector = gates.copy()
        vector[[0, k]] = vector[[k, 0]]
        np.testing.assert_allclose(probs[k], vector, rtol=1e-5, atol=1e-7)
    with Image.open(out / 'heatmap_layers.0.ffn.png') as png:
        assert png.size[0] > 300 and png.size[1] > 200


def test_heatmap_counts_drops_at_low_capacity(hand_routed, tmp_path):
    config, checkpoint, _ = hand_routed
    out = tmp_path / 'low'
    # c = 1: B = 8 of the 25 tokens kept, 17 dropped.
    load_tool('routing_heatmap').main([
        config, checkpoint, '--out',
        str(out), '--layers', '0', '--cfg-options',
        'model.backbone.moe_cfg.eval_capacity_factor=1.0'
    ])
    data = np.load(out / 'routing_heatmap.npz')
    np.testing.assert_allclose(
        np.diag(data['layers.0.ffn/taken']), [8 / 25] * 3)
    np.testing.assert_allclose(
        np.diag(data['layers.0.ffn/dropped']), [17 / 25] * 3)


@pytest.mark.parametrize('layer, match', [
    ('1', 'layer 1 is not an MoE layer: the MoE blocks are \\[0\\]'),
    ('layers.1.ffn', "'layers.1.ffn' is not an MoE layer"),
])
def test_layer_that_is_not_moe_is_an_error(hand_routed, tmp_path, layer,
                                           match):
    config, checkpoint, _ = hand_routed
    with pytest.raises(ValueError, match=match):
        load_tool('routing_heatmap').main(
            [config, checkpoint, '--out',
             str(tmp_path), '--layers', layer])
    assert not list(tmp_path.iterdir())


def test_structure_order_puts_a_permuted_diagonal_on_the_diagonal():
    rng = np.random.RandomState(0)
    matrix = np.eye(4)[:, [2, 0, 3, 1]] + 0.01 * rng.rand(4, 4)
    classes, experts = structure_order(matrix)
    shown = matrix[np.ix_(classes, experts)]
    assert (shown.argmax(1) == np.arange(4)).all()


def test_accumulator_rejects_bad_labels():
    acc = ClassExpertAccumulator(3)
    routing = LayerRouting('soft', torch.ones(1, 2, 4) / 4,
                           torch.ones(1, 2, 4) / 4)
    with pytest.raises(ValueError, match='labels must be in'):
        acc.update(routing, torch.tensor([3]))
