"""Evaluation-time routing by behaviour: each ``eval_*`` option, set in the
constructor or through ``set_eval_routing``, gives the output of the
independent einsum reference run with the new value, and not the output
with the training value."""
import pytest
import torch

from moe_plugin.layers import (SparseMoE, einsum_sparse_moe_forward,
                               set_eval_routing)

DIM, HIDDEN, TOKENS, IMAGES, EXPERTS = 16, 24, 9, 4, 4

#: Training routing of every layer below: top-2, tight capacity (drops),
#: no BPR, groups of 2 images.
TRAINING = dict(top_k=2, capacity_factor=0.5, batch_priority=False,
                group_size=2)
#: For each option, an evaluation value different from the training one.
NEW_VALUES = dict(top_k=1, capacity_factor=1.5, batch_priority=True,
                  group_size=None)


def reference(layer, x, top_k, capacity_factor, batch_priority, group_size):
    """The layer's maths through the one-hot einsum, routing given here."""
    return einsum_sparse_moe_forward(layer, x, top_k, capacity_factor,
                                     batch_priority, group_size)


def make_layer(**eval_options):
    torch.manual_seed(0)
    return SparseMoE(
        DIM, HIDDEN, num_experts=EXPERTS, **TRAINING,
        **eval_options).double().eval()


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randn(IMAGES, TOKENS, DIM, dtype=torch.float64)


def test_training_values_apply_in_evaluation_by_default(tokens):
    layer = make_layer(eval_group_size=TRAINING['group_size'])
    torch.testing.assert_close(
        layer(tokens), reference(layer, tokens, **TRAINING), rtol=1e-12,
        atol=1e-12)


@pytest.mark.parametrize('option', sorted(NEW_VALUES))
@pytest.mark.parametrize('how', ['constructor', 'set_eval_routing'])
def test_eval_option_changes_the_output_as_the_reference(
        option, how, tokens):
    new = NEW_VALUES[option]
    # Every other option keeps its training value in evaluation (the group
    # size too, which otherwise defaults to per-image groups).
    keep = {k: v for k, v in TRAINING.items() if k != option}
    if how == 'constructor':
        layer = make_layer(**dict(
            {'eval_group_size': TRAINING['group_size']},
            **{f'eval_{option}': new}))
    else:
        layer = make_layer(eval_group_size=TRAINING['group_size'])
        assert set_eval_routing(layer, **{option: new}) == 1
    out = layer(tokens)
    expected = reference(layer, tokens, **dict(keep, **{option: new}))
    with_training_value = reference(layer, tokens, **TRAINING)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, with_training_value), (
        f'eval {option}={new!r} gave the output of the training value '
        f'{TRAINING[option]!r}')
    # Training mode still routes with the training values.
    assert layer.train().routing_options() == TRAINING


def test_set_eval_routing_group_size_none_means_per_image(tokens):
    layer = make_layer(eval_group_size=2)
    set_eval_routing(layer, group_size=None)
    assert layer.routing_options()['group_size'] is None
    # Left out, the group size is kept.
    set_eval_routing(layer, top_k=1)
    assert layer.routing_options()['group_size'] is None
    set_eval_routing(layer, group_size=4)
    set_eval_routing(layer, capacity_factor=2.0)
    assert layer.routing_options()['group_size'] == 4
    torch.testing.assert_close(
        layer(tokens),
        reference(layer, tokens, 1, 2.0, False, 4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('options,match', [
    (dict(group_size=0), 'group_size must be >= 1 or None, got 0'),
    (dict(group_size=2.5), 'group_size must be >= 1 or None, got 2.5'),
    (dict(capacity_factor=0.0), 'capacity_factor must be > 0, got 0.0'),
    (dict(capacity_factor=-1), 'capacity_factor must be > 0, got -1'),
    (dict(top_k=0), r'eval_top_k must be in \[1, num_experts=4\], got 0'),
])
def test_set_eval_routing_rejects_bad_values(options, match):
    layer = make_layer()
    before = layer.routing_options()
    with pytest.raises(ValueError, match=match):
        set_eval_routing(layer, **options)
    assert layer.routing_options() == before
