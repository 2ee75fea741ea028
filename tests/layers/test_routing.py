"""Routing against the spec's golden case and a slow Python-loop reference."""
import itertools
import math

import pytest
import torch

from moe_plugin.layers import (assign_top_k, compute_capacity,
                               einsum_top_k_combine, gshard_loss,
                               importance_loss, load_loss, z_loss)

GOLDEN_GATES = torch.tensor([[.4, .0, .2], [.5, .1, .4], [.3, .2, .6]])
# combine[token][expert][slot] from vmoe's unit test (spec 01).
GOLDEN_VANILLA = [[[.4, 0], [0, 0], [0, .2]], [[0, .5], [0, 0], [0, 0]],
                  [[0, 0], [0, 0], [.6, 0]]]
GOLDEN_BPR = [[[0, .4], [0, 0], [0, 0]], [[.5, 0], [0, 0], [0, .4]],
              [[0, 0], [0, 0], [.6, 0]]]


def loop_assign(gates, top_k, capacity, batch_priority=False):
    """Slot assignment one (token, choice) at a time, in plain Python.

    Returns a dict ``(g, s, k) -> (expert, slot or None if dropped)``.
    """
    result = {}
    for g, group in enumerate(gates.tolist()):
        ranked = [
            sorted(range(len(row)), key=lambda e: -row[e])[:top_k]
            for row in group
        ]
        tokens = list(range(len(group)))
        if batch_priority:
            tokens.sort(key=lambda s: -max(group[s]))  # stable sort
        filled = {}
        for k in range(top_k):
            for s in tokens:
                expert = ranked[s][k]
                slot = filled.get(expert, 0)
                filled[expert] = slot + 1
                result[g, s, k] = (expert, slot if slot < capacity else None)
    return result


def assignment_to_dense(assignment, capacity, num_experts):
    """``[G, S, K]`` assignment -> ``[G, S, E, B]`` combine tensor."""
    groups, tokens, top_k = assignment.slot.shape
    dense = torch.zeros(groups, tokens, num_experts, capacity,
                        dtype=assignment.weights.dtype)
    for g, s, k in itertools.product(range(groups), range(tokens),
                                     range(top_k)):
        if assignment.kept[g, s, k]:
            dense[g, s, assignment.expert_index[g, s, k],
                  assignment.slot[g, s, k]] = assignment.weights[g, s, k]
    return dense


@pytest.mark.parametrize('batch_priority,expected',
                         [(False, GOLDEN_VANILLA), (True, GOLDEN_BPR)])
def test_golden_case(batch_priority, expected):
    gates = GOLDEN_GATES[None]
    assignment = assign_top_k(gates, 2, 2, batch_priority)
    expected = torch.tensor(expected)[None]
    torch.testing.assert_close(assignment_to_dense(assignment, 2, 3),
                               expected)
    torch.testing.assert_close(
        einsum_top_k_combine(gates, 2, 2, batch_priority), expected)


def test_golden_case_slots_and_drops():
    vanilla = assign_top_k(GOLDEN_GATES[None], 2, 2)
    # t0: (0,0) (2,1); t1: (0,1) (2,2) dropped; t2: (2,0) (0,2) dropped.
    assert vanilla.expert_index[0].tolist() == [[0, 2], [0, 2], [2, 0]]
    assert vanilla.slot[0].tolist() == [[0, 1], [1, 2], [0, 2]]
    assert vanilla.kept[0].tolist() == [[True, True], [True, False],
                                        [True, False]]


@pytest.mark.parametrize(
    'top_k,capacity,groups,batch_priority',
    [(1, 4, 1, False), (1, 4, 3, True), (2, 4, 1, False), (2, 4, 1, True),
     (2, 8, 3, False), (2, 8, 3, True), (2, 12, 2, False), (1, 1, 2, True),
     (2, 40, 2, True)])
def test_assignment_matches_loop_reference(top_k, capacity, groups,
                                           batch_priority):
    torch.manual_seed(top_k * 100 + capacity * 10 + groups)
    num_experts, tokens = 5, 17
    gates = torch.randn(groups, tokens, num_experts).softmax(-1)
    assignment = assign_top_k(gates, top_k, capacity, batch_priority)
    expected = loop_assign(gates, top_k, capacity, batch_priority)
    for (g, s, k), (expert, slot) in expected.items():
        assert assignment.expert_index[g, s, k] == expert
        assert bool(assignment.kept[g, s, k]) == (slot is not None)
        if slot is not None:
            assert assignment.slot[g, s, k] == slot
    dense = assignment_to_dense(assignment, capacity, num_experts)
    torch.testing.assert_close(
        dense,
        einsum_top_k_combine(gates, top_k, capacity, batch_priority),
        rtol=0,
        atol=0)


def test_renormalize_divides_by_top_k_sum():
    gates = GOLDEN_GATES[None]
    assignment = assign_top_k(gates, 2, 4, renormalize=True)
    torch.testing.assert_close(assignment.weights[0, 0],
                               torch.tensor([.4 / .6, .2 / .6]))
    torch.testing.assert_close(assignment.weights.sum(-1),
                               torch.ones(1, 3))


def test_batch_priority_drops_lowest_priority_tokens():
    torch.manual_seed(0)
    gates = torch.randn(1, 32, 2).mul(3).softmax(-1)
    capacity = 4
    assignment = assign_top_k(gates, 1, capacity, batch_priority=True)
    priority = gates.max(-1).values[0]
    for expert in range(2):
        chose = assignment.expert_index[0, :, 0] == expert
        kept = chose & assignment.kept[0, :, 0]
        assert int(kept.sum()) == min(capacity, int(chose.sum()))
        dropped = chose & ~assignment.kept[0, :, 0]
        if dropped.any():
            assert priority[kept].min() >= priority[dropped].max()


@pytest.mark.parametrize('tokens_k,experts,factor,expected',
                         [(34, 4, 0.5, 8), (136, 4, 1.05, 36),
                          (1576, 32, 1.05, 52), (400 * 2, 8, 1.05, 108)])
def test_capacity_examples(tokens_k, experts, factor, expected):
    assert compute_capacity(tokens_k, experts, 1, factor) == expected


def test_capacity_round_half_to_even_and_explicit():
    # 10 * 1 * 1.0 / 4 = 2.5 -> 2 ; 14 / 4 = 3.5 -> 4 ; 18 / 4 = 4.5 -> 4
    assert [
        compute_capacity(s, 4, 1, 1.0, multiple_of=1, rounding='round')
        for s in (10, 14, 18)
    ] == [2, 4, 4]
    assert compute_capacity(10, 4, 2, capacity=5) == 8
    assert compute_capacity(10, 4, 2, capacity=5, multiple_of=1) == 5


@pytest.mark.parametrize('kwargs,match', [
    (dict(capacity_factor=0.0), 'capacity_factor must be > 0'),
    (dict(capacity_factor=-1.0), 'capacity_factor must be > 0'),
    (dict(capacity=0, multiple_of=1), 'capacity must be > 0'),
    (dict(capacity=-4), 'capacity must be > 0'),
    (dict(capacity_factor=1.0, capacity=4), 'exactly one'),
    (dict(capacity_factor=1.0, rounding='floor'), 'floor'),
])
def test_capacity_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_capacity(8, 4, 1, **kwargs)


def test_losses_match_slow_reference():
    torch.manual_seed(0)
    groups, tokens, experts, top_k, sigma = 3, 7, 4, 2, 0.25
    logits = torch.randn(groups, tokens, experts, dtype=torch.float64)
    noisy = logits + sigma * torch.randn_like(logits)
    gates = logits.softmax(-1)

    def cv2(values):
        mean = sum(values) / len(values)
        var = sum((v - mean)**2 for v in values) / len(values)
        return var / mean**2

    imp, load, gshard, zl = [], [], [], []
    for g in range(groups):
        imp.append(
            cv2([
                sum(float(gates[g, s, e]) for s in range(tokens))
                for e in range(experts)
            ]))
        probs = [0.0] * experts
        for s in range(tokens):
            kth = sorted(noisy[g, s].tolist(), reverse=True)[top_k - 1]
            for e in range(experts):
                z = (kth - float(logits[g, s, e])) / sigma
                probs[e] += 1 - 0.5 * (1 + math.erf(z / math.sqrt(2)))
        load.append(cv2(probs))
        top1 = [0] * experts
        for s in range(tokens):
            top1[int(gates[g, s].argmax())] += 1
        gshard.append(experts**2 * sum(
            top1[e] / tokens * float(gates[g, :, e].mean())
            for e in range(experts)) / experts)
        zl.extend(
            math.log(sum(math.exp(v) for v in logits[g, s].tolist()))**2
            for s in range(tokens))
    torch.testing.assert_close(
        importance_loss(gates).item(), sum(imp) / groups)
    torch.testing.assert_close(
        load_loss(logits, noisy, sigma, top_k).item(), sum(load) / groups)
    torch.testing.assert_close(gshard_loss(gates).item(), sum(gshard) / groups)
    torch.testing.assert_close(z_loss(logits).item(), sum(zl) / len(zl))


def test_balanced_gates_have_zero_importance_loss():
    gates = torch.full((2, 8, 4), 0.25)
    assert importance_loss(gates).item() == 0.0
    assert gshard_loss(torch.eye(4).repeat(1, 2, 1)).item() == pytest.approx(
        1.0)
