"""SparseMoE in training: expert choice against a loop reference, the
per-expert load against an independent count, ``torch.compile`` and
bfloat16 autocast against eager float32, and the remaining bad inputs."""
import pytest
import torch

from moe_plugin.layers import SparseMoE, compute_capacity

DIM, HIDDEN, TOKENS, EXPERTS = 16, 24, 9, 4


def make_layer(**kwargs):
    torch.manual_seed(0)
    return SparseMoE(DIM, HIDDEN, num_experts=EXPERTS, **kwargs)


def apply_expert(layer, expert, x):
    """Expert ``expert`` of ``layer`` on one token ``x [D]`` (no dropout)."""
    experts = layer.experts
    h = experts.act(x @ experts.w1[expert] + experts.b1[expert])
    return h @ experts.w2[expert] + experts.b2[expert]


def loop_expert_choice(layer, x, noise, group_size, capacity):
    """Expert choice, one expert and one token at a time.

    Returns:
        tuple: output ``[B, N, D]`` and the share of tokens no expert took.
    """
    images, tokens, dims = x.shape
    groups = x.reshape(images // group_size, group_size * tokens, dims)
    logits = groups @ layer.router.weight.T + noise
    outputs, untouched = [], 0
    for g in range(groups.shape[0]):
        gates = logits[g].softmax(-1)
        rows = [torch.zeros(dims, dtype=x.dtype)
                for _ in range(groups.shape[1])]
        taken = set()
        for expert in range(layer.num_experts):
            ranked = sorted(range(groups.shape[1]),
                            key=lambda s: -gates[s, expert].item())
            for s in ranked[:capacity]:
                rows[s] = rows[s] + gates[s, expert] * apply_expert(
                    layer, expert, groups[g, s])
                taken.add(s)
        untouched += groups.shape[1] - len(taken)
        outputs.append(torch.stack(rows))
    return (torch.stack(outputs).view_as(x),
            untouched / (images * tokens))


@pytest.mark.parametrize('group_size,capacity_factor', [(2, 1.0), (1, 2.0),
                                                        (4, 0.5)])
def test_expert_choice_training_matches_loop_reference(
        group_size, capacity_factor):
    layer = make_layer(
        router='expert_choice', capacity_factor=capacity_factor,
        capacity_multiple_of=1, noise_std=2.0,
        group_size=group_size).double().train()
    x = torch.randn(4, TOKENS, DIM, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, TOKENS, DIM, dtype=torch.float64)
    torch.manual_seed(7)
    out = layer(x)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(out, params, grad_out)

    # The router draws its noise first: redraw it from the same seed.
    group_tokens = group_size * TOKENS
    torch.manual_seed(7)
    noise = torch.randn(4 // group_size, group_tokens, EXPERTS,
                        dtype=torch.float64) * (2.0 / EXPERTS)
    capacity = compute_capacity(group_tokens, EXPERTS, 1, capacity_factor,
                                multiple_of=1)
    expected, untouched = loop_expert_choice(layer, x, noise, group_size,
                                             capacity)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert layer.moe_metrics['dropped_fraction'].item() == pytest.approx(
        untouched)
    for param, grad, expected_grad in zip(['x', *dict(
            layer.named_parameters())], grads, expected_grads):
        torch.testing.assert_close(
            grad, expected_grad, rtol=1e-10, atol=1e-12, msg=param)
    # Without the noise the routing differs: the noise was really used.
    layer.eval()
    assert not torch.allclose(layer(x.detach()), expected.detach())


@pytest.mark.parametrize('top_k,group_size', [(1, None), (2, 2), (3, 4)])
def test_expert_load_counts_token_choice_pairs(top_k, group_size):
    layer = make_layer(top_k=top_k, capacity_factor=0.5,
                       group_size=group_size,
                       eval_group_size=group_size).double().eval()
    x = torch.randn(4, TOKENS, DIM, dtype=torch.float64)
    layer(x)
    # Count every (token, choice) pair, dropped or not, in plain Python.
    counts = [0] * EXPERTS
    for token in x.reshape(-1, DIM):
        gates = (layer.router.weight @ token).softmax(-1).tolist()
        for expert in sorted(range(EXPERTS), key=lambda e: -gates[e])[:top_k]:
            counts[expert] += 1
    expected = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    torch.testing.assert_close(layer.moe_metrics['expert_load'].float(),
                               expected)


@pytest.mark.parametrize('kwargs', [
    dict(top_k=2, capacity_factor=0.5, batch_priority=True, group_size=2),
    dict(top_k=1, capacity_factor=1.05, renormalize=True),
    dict(router='expert_choice', capacity_factor=1.0, group_size=2),
])
def test_compiled_layer_equals_eager(kwargs):
    layer = make_layer(noise_std=0.0, **kwargs).train()
    x = torch.randn(4, TOKENS, DIM)
    grad_out = torch.randn(4, TOKENS, DIM)

    def run(module):
        inputs = x.clone().requires_grad_()
        out = module(inputs)
        grads = torch.autograd.grad(out, [inputs, *layer.parameters()],
                                    grad_out)
        return out, grads

    eager_out, eager_grads = run(layer)
    # Each case compiles afresh: dynamo would otherwise recompile this code
    # with the capacity factor as a symbolic float, which it cannot lift.
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
    compiled_out, compiled_grads = run(compiled)
    torch.testing.assert_close(compiled_out, eager_out)
    for name, grad, expected in zip(['x', *dict(layer.named_parameters())],
                                    compiled_grads, eager_grads):
        torch.testing.assert_close(grad, expected, msg=name)


@pytest.mark.parametrize('router', ['token_choice', 'expert_choice'])
def test_bfloat16_autocast_keeps_the_float32_routing(router):
    layer = make_layer(router=router, capacity_factor=0.5, top_k=2,
                       group_size=2).eval()
    seen = []
    layer.router.register_forward_hook(
        lambda module, args, output: seen.append(output[0]))
    x = torch.randn(4, TOKENS, DIM)
    reference = layer(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        half = layer(x)
    full_routing, half_routing = seen
    for field in ('slot_token', 'slot_pair', 'slot_index', 'kept'):
        a, b = getattr(full_routing, field), getattr(half_routing, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert torch.equal(a, b), field
    for field in ('combine_weights', 'slot_weights'):
        a, b = getattr(full_routing, field), getattr(half_routing, field)
        if a is not None:
            assert b.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The experts did run in bfloat16.
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference, rtol=0.05, atol=0.05)


@pytest.mark.parametrize('kwargs,match', [
    (dict(eval_group_size=0), 'eval_group_size must be >= 1 or None, got 0'),
    (dict(group_size=1.5), 'group_size must be >= 1 or None, got 1.5'),
    (dict(eval_capacity_factor=0.0), 'capacity_factor must be > 0, got 0.0'),
    (dict(eval_capacity_factor=-0.5), 'capacity_factor must be > 0'),
    (dict(capacity_rounding='floor'),
     "capacity_rounding must be one of \\('ceil', 'round'\\), got 'floor'"),
    (dict(capacity=8, capacity_rounding='floor'), "got 'floor'"),
])
def test_remaining_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseMoE(DIM, HIDDEN, num_experts=EXPERTS, **kwargs)
