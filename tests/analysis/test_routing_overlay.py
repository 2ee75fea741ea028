"""routing_overlay.py on a hand-routed model; MMPretrain's inferencer and
get_model on our configs and checkpoints."""
import json

import numpy as np
import pytest
import torch
from mmpretrain.apis import ImageClassificationInferencer
from PIL import Image

from moe_plugin.analysis.overlay import token_grid
from moe_plugin.compat import run_checkpoint_scope

from .conftest import CLASSES, SIZE
from .helpers import load_tool


@pytest.fixture(scope='module')
def half_image(tmp_path_factory):
    """Left 8 px red (patch columns 0-1), right 12 px green (2-4)."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[:, :8] = (255, 0, 0)
    img[:, 8:] = (0, 255, 0)
    path = tmp_path_factory.mktemp('overlay') / 'half.png'
    Image.fromarray(img).save(path)
    return str(path)


LEFT = [r * 5 + c for r in range(5) for c in range(2)]
RIGHT = [r * 5 + c for r in range(5) for c in range(2, 5)]


def test_overlay_shows_which_patches_each_expert_took(hand_routed,
                                                      half_image, tmp_path):
    config, checkpoint, _ = hand_routed
    out = tmp_path / 'full'
    report = load_tool('routing_overlay').main(
        [config, checkpoint, half_image, '--out', str(out)])
    layer = report['layers']['layers.0.ffn']
    assert layer['grid'] == [5, 5] and layer['extra_tokens'] == 0
    # K = 1, capacity 28 >= 25: red patches to expert 0, green to 1.
    assert layer['taken'] == [LEFT, RIGHT, [], []]
    assert layer['dropped'] == [[], [], [], []]
    saved = json.loads((out / 'overlay.json').read_text())
    assert saved['layers']['layers.0.ffn']['taken'] == layer['taken']
    assert [name for name, _ in saved['top5']] == sorted(
        CLASSES, key=dict(saved['top5']).get, reverse=True)
    with Image.open(out / 'overlay_layers.0.ffn.png') as png:
        assert png.size[0] > 400


@pytest.mark.parametrize('bpr', ['off', 'on'])
def test_overlay_marks_the_patches_dropped_at_low_capacity(
        hand_routed, half_image, tmp_path, bpr):
    config, checkpoint, _ = hand_routed
    # c = 1: B = ceil(25 / 4) = 7 -> 8 slots per expert. Expert 0 gets 10
    # red patches and expert 1 15 green ones; each keeps its first 8 in
    # token order (all of a colour have the same priority, and BPR's sort
    # is stable).
    report = load_tool('routing_overlay').main([
        config, checkpoint, half_image, '--out',
        str(tmp_path), '--capacity', '1', '--bpr', bpr
    ])
    layer = report['layers']['layers.0.ffn']
    assert layer['taken'] == [LEFT[:8], RIGHT[:8], [], []]
    assert layer['dropped'] == [LEFT[8:], RIGHT[8:], [], []]


def test_bpr_drops_the_low_priority_patches(hand_routed, tmp_path):
    # Rows 0-2 dark red (gate of expert 0 about 0.57), rows 3-4 bright red
    # (about 0.82): all 25 patches choose expert 0, which keeps 8 (c = 1).
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[:12] = (128, 0, 0)
    img[12:] = (255, 0, 0)
    path = tmp_path / 'shades.png'
    Image.fromarray(img).save(path)
    config, checkpoint, _ = hand_routed
    tool = load_tool('routing_overlay')
    taken = {}
    for bpr in ('off', 'on'):
        report = tool.main([
            config, checkpoint, str(path), '--out',
            str(tmp_path / bpr), '--capacity', '1', '--bpr', bpr
        ])
        taken[bpr] = report['layers']['layers.0.ffn']['taken'][0]
    # Vanilla: the first 8 in token order (dark); BPR: the bright ones
    # first, in token order.
    assert taken['off'] == list(range(8))
    assert taken['on'] == list(range(15, 23))


def test_inferencer_and_get_model_run_our_config_and_checkpoint(
        hand_routed, half_image, tmp_path):
    config, checkpoint, _ = hand_routed
    report = load_tool('routing_overlay').main(
        [config, checkpoint, half_image, '--out', str(tmp_path)])
    # The checkpoint is shaped like a run's (message hub): MMPretrain's
    # loader needs the scoped allow-list.
    with run_checkpoint_scope():
        inferencer = ImageClassificationInferencer(
            config, pretrained=checkpoint, device='cpu')
    (result, ) = inferencer(half_image)
    assert result['pred_class'] == report['top5'][0][0]
    np.testing.assert_allclose(
        sorted(result['pred_scores'], reverse=True),
        [p for _, p in report['top5']], rtol=1e-5)
    assert inferencer.classes == list(CLASSES)


def test_unreadable_image_is_an_error(hand_routed, tmp_path):
    config, checkpoint, _ = hand_routed
    fake = tmp_path / 'broken.png'
    fake.write_text('not an image')
    for path in (fake, tmp_path / 'missing.png'):
        with pytest.raises(ValueError, match='cannot read the image'):
            load_tool('routing_overlay').main(
                [config, checkpoint, str(path), '--out',
                 str(tmp_path / 'o')])


def test_bad_layer_and_top_k(hand_routed, half_image, tmp_path):
    config, checkpoint, _ = hand_routed
    tool = load_tool('routing_overlay')
    with pytest.raises(ValueError, match='layer 1 is not an MoE layer'):
        tool.main([config, checkpoint, half_image, '--out', str(tmp_path),
                   '--layers', '1'])
    with pytest.raises(ValueError, match='eval_top_k must be in'):
        tool.main([config, checkpoint, half_image, '--out', str(tmp_path),
                   '--top-k', '9', '--force'])
    with pytest.raises(SystemExit):
        tool.main([config, checkpoint, half_image, '--out', str(tmp_path),
                   '--capacity', '0'])


def test_token_grid():
    model = torch.nn.Linear(1, 1)
    assert token_grid(model, 16) == ((4, 4), 0)
    with pytest.raises(ValueError, match='cannot lay 7 tokens'):
        token_grid(model, 7)
