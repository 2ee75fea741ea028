"""SoftMoE against a slow per-token, per-slot loop of the spec's equations."""

import pytest
import torch

from moe_plugin.layers import SoftMoE

DIM, HIDDEN, TOKENS, EXPERTS = 8, 12, 5, 3


def expert(experts, e, v):
    """Expert ``e`` of a ``BatchedExperts`` on one vector (no dropout)."""
    h = experts.act(v @ experts.w1[e] + experts.b1[e])
    return h @ experts.w2[e] + experts.b2[e]


def loop_soft_moe(layer, x):
    """Soft MoE one image, token and slot at a time (float64)."""
    images, tokens, _ = x.shape
    slots = layer.slots_per_expert
    outputs, dispatch_sums, combine_sums = [], [], []
    for b in range(images):
        keys = [x[b, m] / torch.sqrt(x[b, m].square().sum() + 1e-6)
                for m in range(tokens)]
        logit = {}
        for e in range(EXPERTS):
            for j in range(slots):
                column = layer.mu[:, e, j]
                query = column / torch.sqrt(column.square().sum() + 1e-6)
                for m in range(tokens):
                    logit[m, e, j] = layer.scale * (keys[m] @ query)
        slot_out = {}
        for e in range(EXPERTS):
            for j in range(slots):
                norm = sum(torch.exp(logit[m, e, j]) for m in range(tokens))
                weights = [torch.exp(logit[m, e, j]) / norm
                           for m in range(tokens)]
                dispatch_sums.append(sum(weights))
                slot_in = sum(w * x[b, m] for m, w in enumerate(weights))
                slot_out[e, j] = expert(layer.experts, e, slot_in)
        rows = []
        for m in range(tokens):
            norm = sum(torch.exp(logit[m, e, j]) for e in range(EXPERTS)
                       for j in range(slots))
            weights = {k: torch.exp(logit[(m, ) + k]) / norm
                       for k in slot_out}
            combine_sums.append(sum(weights.values()))
            rows.append(sum(weights[k] * slot_out[k] for k in slot_out))
        outputs.append(torch.stack(rows))
    return torch.stack(outputs), dispatch_sums, combine_sums


def make_layer(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault('slots_per_expert', 2)
    return SoftMoE(DIM, HIDDEN, num_experts=EXPERTS, **kwargs).double()


def test_matches_loop_reference_and_weights_sum_to_one():
    layer = make_layer()
    with torch.no_grad():
        layer.scale.fill_(3.0)  # a scale that matters
    x = torch.randn(3, TOKENS, DIM, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, TOKENS, DIM, dtype=torch.float64)
    out = layer(x)
    expected, dispatch_sums, combine_sums = loop_soft_moe(layer, x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for total in dispatch_sums + combine_sums:
        assert total.item() == pytest.approx(1.0, abs=1e-12)
    dispatch, combine = layer.routing_weights(x)
    torch.testing.assert_close(dispatch.sum(1), torch.ones_like(
        dispatch.sum(1)))
    torch.testing.assert_close(combine.sum(-1), torch.ones_like(
        combine.sum(-1)))
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(out, params, grad_out)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    for name, grad, ref in zip(['x', *dict(layer.named_parameters())], grads,
                               expected_grads):
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12,
                                   msg=name)
    load = layer.moe_metrics['expert_load']
    assert load.shape == (EXPERTS, ) and load.sum().item() == pytest.approx(1)


def test_batch_independent_and_deterministic():
    layer = make_layer().eval()
    x = torch.randn(4, TOKENS, DIM, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    torch.testing.assert_close(out[1:2], layer(x[1:2]), rtol=1e-13,
                               atol=1e-13)


@pytest.mark.parametrize('tokens,factor,slots', [(10, 1.0, 3), (12, 1.0, 4),
                                                 (197, 1.0, 66),
                                                 (10, 0.5, 2)])
def test_capacity_factor_gives_rounded_slots(tokens, factor, slots):
    # round(N * c / E), half to even: 10/3 -> 3, 12/3 -> 4, 5/3 -> 2.
    layer = SoftMoE(DIM, HIDDEN, num_experts=EXPERTS, capacity_factor=factor,
                    num_tokens=tokens)
    assert layer.slots_per_expert == slots
    assert layer.mu.shape == (DIM, EXPERTS, slots)


def test_routing_stays_float32_under_bfloat16_autocast():
    layer = make_layer().float()
    x = torch.randn(2, TOKENS, DIM)
    reference = layer.routing_weights(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        half = layer.routing_weights(x)
        out = layer(x)
    for a, b in zip(reference, half):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize('kwargs,match', [
    (dict(slots_per_expert=0), 'slots_per_expert must be an integer >= 1, '
     'got 0'),
    (dict(slots_per_expert=1.5), 'got 1.5'),
    (dict(capacity_factor=1.0), 'needs num_tokens'),
    (dict(capacity_factor=0.1, num_tokens=5), 'gives 0 slots per expert'),
    (dict(capacity_factor=-1.0, num_tokens=5), 'capacity_factor must be > 0'),
    (dict(num_experts=0), 'num_experts must be >= 1, got 0'),
    (dict(expert_drop=1.5), 'dropout'),
])
def test_bad_config(kwargs, match):
    kwargs.setdefault('num_experts', EXPERTS)
    with pytest.raises(ValueError, match=match):
        SoftMoE(DIM, HIDDEN, **kwargs)


def test_expert_dropout_keeps_with_probability_one_minus_p():
    from moe_plugin.layers.experts import ExpertDropout
    drop = ExpertDropout(0.4).train()
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    out = drop(x)
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.6, abs=0.005)
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.6))
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())
    x = x.detach()
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(ExpertDropout(0.0).train()(x), x)


def test_expert_dropout_equals_the_rand_formula_on_32_bit_words():
    """On a CPU the output and gradient are those of ``x * (u / 2**32 >=
    p) / (1 - p)``, ``u - 2**31`` the signed 32-bit halves of the
    generator's 64-bit draws (lower half first), computed here in Python
    integers (float64; other devices use ``F.dropout``)."""
    from moe_plugin.layers.experts import ExpertDropout
    p = 0.4
    drop = ExpertDropout(p).train()
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    torch.manual_seed(1)
    out = drop(x)
    torch.manual_seed(1)
    draws = torch.empty((x.numel() + 1) // 2, dtype=torch.int64)
    draws.random_(-2**63, None)
    halves = []
    for value in draws.tolist():
        value %= 2**64
        for half in (value % 2**32, value // 2**32):
            signed = half - 2**32 if half >= 2**31 else half
            halves.append(signed + 2**31)
    keep = torch.tensor([u / 2**32 >= p for u in halves[:x.numel()]])
    expected = x * keep.view_as(x).to(x.dtype) / (1 - p)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=0)
    got, = torch.autograd.grad(out, x, grad)
    want, = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)


@pytest.mark.parametrize('p', [0.4, 0.1, 0.5])
def test_expert_dropout_keeps_words_from_the_exact_threshold(p):
    """Hand-computed boundary: the word ``u - 2**31`` is kept iff ``u >=
    ceil(p * 2**32)``, so the keep probability is ``1 - p`` to ``2**-32``."""
    import math

    from moe_plugin.layers.experts import ExpertDropout
    first_kept = math.ceil(p * 2**32) - 2**31
    words = torch.tensor(
        [-2**31, first_kept - 1, first_kept, first_kept + 1, 2**31 - 1],
        dtype=torch.int32)
    scale = ExpertDropout(p).keep_scale(words, torch.float64)
    kept = 1 / (1 - p)
    assert scale.tolist() == [0.0, 0.0, kept, kept, kept]


def test_expert_dropout_traces_under_torch_compile():
    """torch.compile (AOT autograd, the tracing half of ``inductor``)
    compiles a training SpheroMoE with expert dropout: the CPU mask's int64
    -> int32 view is not traced, compiled code draws with ``F.dropout``."""
    from moe_plugin.layers import SpheroMoE
    torch.manual_seed(0)
    layer = SpheroMoE(DIM, HIDDEN, num_experts=2, num_universal_experts=2,
                      expert_drop=0.4).train()
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=False)
    x = torch.randn(2, 5, DIM, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    assert out.shape == x.shape and torch.isfinite(x.grad).all()
    dropped = (layer.core_experts.w1.grad == 0).float().mean()
    assert 0 < dropped < 1
