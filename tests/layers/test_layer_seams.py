"""The seams every caller uses: the capacity in force, routing a group
batch, the router's clean logits, the MoE layer contract and the activation
vocabulary."""
import copy

import pytest
import torch
import torch.nn.functional as F

from moe_plugin.layers import (BatchedExperts, MoELayer, SoftMoE, SparseMoE,
                               SpheroMoE, gelu_approximation, is_moe_layer,
                               set_eval_routing)

DIMS, HIDDEN = 16, 32


@pytest.mark.parametrize('kwargs, eval_options, tokens, expected', [
    # 10 tokens, K=2, c=1.05, E=4: 5.25 -> ceil 6 -> multiple of 4: 8.
    (dict(num_experts=4, top_k=2), None, 10, 8),
    # Evaluation override K=1, c=2: 10 * 2 / 4 = 5 -> 8.
    (dict(num_experts=4, top_k=2), dict(top_k=1, capacity_factor=2.0), 10,
     8),
    # Explicit capacity 3 -> multiple of 4: 4.
    (dict(num_experts=4, top_k=1, capacity=3), None, 10, 4),
    # round: 2 * 2.5 / 2 = 2.5 -> half to even 2 (ceil gives 3).
    (dict(num_experts=2, top_k=1, capacity_factor=2.5,
          capacity_rounding='round', capacity_multiple_of=1), None, 2, 2),
    (dict(num_experts=2, top_k=1, capacity_factor=2.5,
          capacity_multiple_of=1), None, 2, 3),
    # Expert choice: 10 * 9 / 4 = 22.5 -> 23 -> 24, at most the 10 tokens.
    (dict(num_experts=4, router='expert_choice', capacity_factor=9.0), None,
     10, 10),
    # Expert choice counts K = 1: 10 * 1.05 / 4 = 2.625 -> 3 -> 4.
    (dict(num_experts=4, top_k=2, router='expert_choice'), None, 10, 4),
])
def test_capacity_for_against_hand_computed_values(kwargs, eval_options,
                                                   tokens, expected):
    layer = SparseMoE(DIMS, HIDDEN, **kwargs)
    if eval_options is not None:
        set_eval_routing(layer, **eval_options)
        layer.eval()
    assert layer.capacity_for(tokens) == expected


def test_capacity_for_follows_the_mode():
    layer = SparseMoE(DIMS, HIDDEN, num_experts=4, top_k=2,
                      eval_capacity_factor=4.0)
    # Training: 16 * 2 * 1.05 / 4 = 8.4 -> 12; evaluation: 32 -> 32.
    assert layer.train().capacity_for(16) == 12
    assert layer.eval().capacity_for(16) == 32


@pytest.mark.parametrize('router', ['token_choice', 'expert_choice'])
@pytest.mark.parametrize('training', [False, True])
def test_route_is_what_the_forward_routes_with(router, training):
    torch.manual_seed(0)
    layer = SparseMoE(DIMS, HIDDEN, num_experts=4, top_k=2, group_size=2,
                      eval_group_size=2, batch_priority=True,
                      renormalize=True, router=router,
                      capacity_factor=0.8).train(training)
    x = torch.randn(4, 5, DIMS)
    torch.manual_seed(1)
    out = layer(x)
    metrics = layer.moe_metrics
    torch.manual_seed(1)
    groups = layer.group(x, 2)
    dispatcher, routed = layer.route(groups)
    flat = groups.reshape(-1, DIMS)
    expected = dispatcher.combine(layer.experts(dispatcher.dispatch(flat)))
    assert torch.equal(out, expected.view_as(x))
    assert routed.keys() == metrics.keys()
    for key, value in metrics.items():
        assert torch.equal(routed[key], value), key


def test_router_arguments_name_the_options_in_force():
    layer = SparseMoE(DIMS, HIDDEN, num_experts=4, top_k=2,
                      batch_priority=True, renormalize=True,
                      eval_top_k=1, eval_batch_priority=False)
    assert layer.train().router_arguments(10) == dict(
        capacity=8, top_k=2, batch_priority=True, renormalize=True)
    assert layer.eval().router_arguments(10) == dict(
        capacity=4, top_k=1, batch_priority=False, renormalize=True)
    expert_choice = SparseMoE(DIMS, HIDDEN, num_experts=4,
                              router='expert_choice')
    assert expert_choice.router_arguments(10) == dict(capacity=4)


def test_router_logits_are_float32_and_noise_free():
    torch.manual_seed(0)
    layer = SparseMoE(DIMS, HIDDEN, num_experts=4).train()
    x = torch.randn(2, 5, DIMS, dtype=torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = layer.router.logits(x)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, x.float() @ layer.router.weight.T)
    assert torch.equal(layer.router.logits(x), logits)  # no training noise


def _layers():
    return [
        SparseMoE(DIMS, HIDDEN, num_experts=4),
        SoftMoE(DIMS, HIDDEN, num_experts=4),
        SpheroMoE(DIMS, HIDDEN, num_experts=2, num_universal_experts=4),
        SpheroMoE(DIMS, HIDDEN, num_experts=2),
    ]


def test_moe_layer_contract():
    for layer, groups in zip(_layers(),
                             [['experts'], ['experts'],
                              ['core_experts', 'univ_experts'],
                              ['core_experts']]):
        assert isinstance(layer, MoELayer) and is_moe_layer(layer)
        assert layer.moe_metrics == {}
        experts = layer.expert_groups()
        assert list(experts) == groups
        assert all(isinstance(e, BatchedExperts) for e in experts.values())
        assert all(e.expert_shard is None for e in experts.values())
        layer.train()(torch.randn(2, 5, DIMS, requires_grad=True))
        assert 'expert_load' in layer.moe_metrics
        assert copy.deepcopy(layer).moe_metrics == {}
        assert 'expert_load' in layer.moe_metrics
        assert not hasattr(layer, 'expert_parallel')


def test_is_moe_layer_is_the_moe_metrics_contract():

    class OwnLayer(torch.nn.Linear):

        def __init__(self):
            super().__init__(DIMS, DIMS)
            self.moe_metrics = {}

    assert is_moe_layer(OwnLayer())
    assert not is_moe_layer(torch.nn.Linear(DIMS, DIMS))
    assert not is_moe_layer(BatchedExperts(2, DIMS, HIDDEN))


def test_registered_layer_types_are_the_moe_layers():
    from moe_plugin.models.builder import MOE_LAYER_TYPES
    assert MOE_LAYER_TYPES == ('SparseMoE', 'SoftMoE', 'SpheroMoE')


def test_one_activation_vocabulary():
    assert gelu_approximation('gelu_tanh') == 'tanh'
    assert gelu_approximation('gelu') == 'none'
    experts = BatchedExperts(2, DIMS, HIDDEN, act='gelu_tanh')
    x = torch.randn(3, DIMS)
    assert torch.equal(experts.act(x), F.gelu(x, approximate='tanh'))
    with pytest.raises(ValueError, match=r"`act` must be one of \['gelu', "
                       r"'gelu_tanh'\], got 'relu'"):
        gelu_approximation('relu', '`act`')
