"""Exact ties in routing go to the lower index, as jax ``lax.top_k``.

The reference is Python's ``sorted`` (stable): rank by value, descending,
equal values in index order.
"""
import pytest
import torch

from moe_plugin.layers import SparseMoE, assign_top_k
from moe_plugin.layers.routing import stable_topk


def python_topk(row, k):
    """Indices of the k largest values, ties in increasing index order."""
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64,
                                   torch.bfloat16, torch.float16])
@pytest.mark.parametrize('k', [1, 3, 7])
def test_stable_topk_matches_stable_python_sort(dtype, k):
    torch.manual_seed(k)
    # Few distinct values (negative, zero, positive): ties everywhere.
    levels = torch.tensor([-2.5, -1e-3, 0.0, 1e-30, 0.25, 0.25, 3.0])
    x = levels[torch.randint(len(levels), (4, 5, 9))].to(dtype)
    values, indices = stable_topk(x, k, dim=-1)
    for row, row_values, row_indices in zip(x.view(-1, 9).tolist(),
                                            values.view(-1, k).tolist(),
                                            indices.view(-1, k).tolist()):
        expected = python_topk(row, k)
        assert row_indices == expected
        assert row_values == [row[i] for i in expected]
    assert values.dtype == dtype


def test_stable_topk_other_dim_and_signed_zero():
    x = torch.tensor([[0.0, 1.0], [-0.0, 1.0], [0.0, 1.0], [-1.0, 1.0]])
    values, indices = stable_topk(x, 3, dim=0)
    # -0.0 == 0.0: rows 0, 1, 2 tie in column 0; column 1 is all equal.
    assert indices.tolist() == [[0, 0], [1, 1], [2, 2]]
    assert values[:, 1].tolist() == [1.0, 1.0, 1.0]


def test_stable_topk_equals_topk_without_ties():
    torch.manual_seed(0)
    x = torch.randn(6, 40, 33).softmax(-1)
    values, indices = stable_topk(x, 5)
    expected_values, expected_indices = x.topk(5)
    assert torch.equal(values, expected_values)
    assert torch.equal(indices, expected_indices)


def test_stable_topk_keeps_the_gradient():
    x = torch.randn(3, 8, requires_grad=True)
    values, _ = stable_topk(x, 2)
    values.sum().backward()
    expected = torch.zeros(3, 8)
    expected.scatter_(1, x.detach().topk(2).indices, 1.0)
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize('batch_priority', [False, True])
def test_token_choice_ties_pick_lower_experts_and_fill_in_order(
        batch_priority):
    # A freshly zero router: every gate is 1/E.
    groups, tokens, experts, top_k, capacity = 2, 12, 4, 2, 8
    gates = torch.full((groups, tokens, experts), 1.0 / experts)
    assignment = assign_top_k(gates, top_k, capacity, batch_priority)
    assert assignment.expert_index.tolist() == [[[0, 1]] * tokens] * groups
    # Choice-major, group order (BPR's stable sort of equal priorities keeps
    # the group order): first choices fill expert 0, second choices expert 1.
    assert assignment.slot.tolist() == [[[s, s] for s in range(tokens)]
                                        ] * groups
    assert assignment.kept.tolist() == [[[s < capacity] * 2
                                         for s in range(tokens)]] * groups


def test_token_choice_partial_ties():
    # Token 0: experts 1 and 3 tie for first; token 1: 0, 2 tie for second.
    gates = torch.tensor([[[.1, .4, .1, .4], [.5, .1, .25, .15],
                           [.2, .3, .3, .2]]])
    gates[0, 1] = torch.tensor([.5, .1, .2, .2])
    assignment = assign_top_k(gates, 2, 4)
    assert assignment.expert_index[0].tolist() == [[1, 3], [0, 2], [1, 2]]


def _zero_router_layer(router, capacity):
    torch.manual_seed(0)
    layer = SparseMoE(
        8, 16, num_experts=4, top_k=2, capacity=capacity,
        capacity_multiple_of=1, router=router, noise_std=0.0).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
    return layer


def test_expert_choice_ties_take_the_lower_token_indices():
    layer = _zero_router_layer('expert_choice', capacity=5)
    x = torch.randn(1, 9, 8)
    y = layer(x)
    # Every gate is 1/4: each expert takes tokens 0..4; tokens 5..8 get 0.
    expert_sum = sum(layer.experts(x[0, :5].expand(4, -1, -1)))
    torch.testing.assert_close(y[0, :5], expert_sum / 4)
    assert torch.equal(y[0, 5:], torch.zeros(4, 8))
    assert layer.moe_metrics['dropped_fraction'].item() == pytest.approx(4 /
                                                                         9)


def test_expert_choice_tie_straddling_the_capacity_boundary():
    layer = _zero_router_layer('expert_choice', capacity=3)
    # A router reading one input feature: tokens 1, 4, 6 and 7 tie on a
    # larger gate for expert 0 (and a smaller one for the others); the other
    # tokens tie on everything.
    with torch.no_grad():
        layer.router.weight[0, 0] = 1.0
    torch.manual_seed(1)
    x = torch.randn(1, 8, 8)
    x[0, :, 0] = torch.tensor([0., 2., 0., 0., 2., 0., 2., 2.])
    y = layer(x)[0]
    gates = (x[0] @ layer.router.weight.T).softmax(-1)
    out = layer.experts(x[0].expand(4, -1, -1))  # every expert on every token
    expected = torch.zeros(8, 8)
    # Expert 0 takes the first three of the tied 1, 4, 6, 7 (not 7); experts
    # 1..3 the first three of the tied 0, 2, 3, 5 (not 5).
    for token in (1, 4, 6):
        expected[token] = gates[token, 0] * out[0, token]
    for token in (0, 2, 3):
        expected[token] = sum(gates[token, e] * out[e, token]
                              for e in (1, 2, 3))
    torch.testing.assert_close(y, expected)
    assert torch.equal(y[[5, 7]], torch.zeros(2, 8))


def test_token_choice_zero_router_layer_output():
    layer = _zero_router_layer('token_choice', capacity=5)
    x = torch.randn(1, 9, 8)
    y = layer(x)
    # Every token picks experts 0 and 1 (gate 1/4 each); slots 0..4 kept.
    out = layer.experts(x[0, :5].expand(4, -1, -1))
    torch.testing.assert_close(y[0, :5], (out[0] + out[1]) / 4)
    assert torch.equal(y[0, 5:], torch.zeros(4, 8))
