"""SpheroMoE against a slow per-token, per-slot loop of MoE Jetpack's
equations; entmax-1.5 against a bisection and the ``entmax`` package."""
import sys

import pytest
import torch

from moe_plugin.layers import SpheroMoE

DIM, HIDDEN, TOKENS, CORE, UNIV, SLOTS = 8, 16, 5, 2, 3, 2


def entmax15_bisection(z, iters=200):
    """``p_i = max(z_i / 2 - tau, 0)^2`` with ``sum p = 1``.

    The support comes from a bisection on ``tau``; ``tau`` is then solved
    exactly on that support, so that gradients flow through it.
    """
    low, high = (z.max() / 2 - 1).item(), (z.max() / 2).item()
    for _ in range(iters):
        tau = (low + high) / 2
        if ((z.detach() / 2 - tau).clamp(min=0).square().sum() > 1):
            low = tau
        else:
            high = tau
    support = z.detach() / 2 > (low + high) / 2
    half = z[support] / 2
    spread = (half - half.mean()).square().sum()
    tau = half.mean() - torch.sqrt((1 - spread) / support.sum())
    return (z / 2 - tau).clamp(min=0).square()


def apply_expert(experts, e, v):
    h = experts.act(v @ experts.w1[e] + experts.b1[e])
    return h @ experts.w2[e] + experts.b2[e]


def loop_sphero_moe(layer, x, noise=None):
    """SpheroMoE one image, token and slot at a time (float64)."""
    images, tokens, dims = x.shape
    slots = layer.slots_per_expert
    experts = range(layer.num_experts)
    tau_d, tau_c = layer.scales[0], layer.scales[1]
    outputs, combines = [], []
    for b in range(images):
        keys = []
        for m in range(tokens):
            key = x[b, m]
            if layer.normalize_keys:
                key = key / (torch.sqrt(key.square().sum()) + 1e-6)
            keys.append(key)
        logit = {}
        for e in experts:
            for j in range(slots):
                q = layer.phi[e, j]
                if isinstance(layer.slot_norm, torch.nn.LayerNorm):
                    q = (q - q.mean()) / torch.sqrt(
                        (q - q.mean()).square().mean() + 1e-5)
                    q = q * layer.slot_norm.weight + layer.slot_norm.bias
                q = q / (torch.sqrt(q.square().sum()) + 1e-6)
                for m in range(tokens):
                    logit[m, e, j] = keys[m] @ q
        extra = (lambda m, e, j: 0.0) if noise is None else (
            lambda m, e, j: noise[b, m, e, j])
        slot_out = {}
        for e in experts:
            for j in range(slots):
                scores = [torch.exp(logit[m, e, j] / tau_d + extra(m, e, j))
                          for m in range(tokens)]
                slot_in = sum(s / sum(scores) * x[b, m]
                              for m, s in enumerate(scores))
                if layer.scale_in is not None:
                    group = int(e >= layer.num_core_experts)
                    slot_in = slot_in * layer.scale_in[group].gamma + \
                        layer.scale_in[group].beta
                if e < layer.num_core_experts:
                    y = apply_expert(layer.core_experts, e, slot_in)
                else:
                    y = apply_expert(layer.univ_experts,
                                     e - layer.num_core_experts, slot_in)
                if layer.scale_out is not None:
                    y = y * layer.scale_out[group].gamma + \
                        layer.scale_out[group].beta
                slot_out[e, j] = y
        keys_order = sorted(slot_out)
        rows = []
        for m in range(tokens):
            z = torch.stack([logit[(m, ) + k] / tau_c + extra(m, *k)
                             for k in keys_order])
            if layer.combine == 'entmax15':
                weights = entmax15_bisection(z)
            else:
                weights = z.softmax(0)
            combines.append(weights)
            rows.append(sum(w * slot_out[k]
                            for w, k in zip(weights, keys_order)))
        outputs.append(torch.stack(rows))
    return torch.stack(outputs), combines


def make_layer(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault('num_universal_experts', UNIV)
    kwargs.setdefault('slots_per_expert', SLOTS)
    layer = SpheroMoE(DIM, HIDDEN, CORE, **kwargs).double()
    with torch.no_grad():
        layer.scales[0].fill_(0.3)
        layer.scales[1].fill_(0.7)
        if isinstance(layer.slot_norm, torch.nn.LayerNorm):
            layer.slot_norm.weight.uniform_(0.5, 1.5)
            layer.slot_norm.bias.normal_(std=0.1)
        if layer.scale_in is not None:
            for scale in (*layer.scale_in, *layer.scale_out):
                scale.gamma.uniform_(0.5, 1.5)
                scale.beta.normal_(std=0.1)
    return layer


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(combine='entmax15'),
    dict(normalize_keys=False, slot_layernorm=False),
    dict(expert_layer_scale=True, combine='entmax15'),
    dict(num_universal_experts=0),
])
def test_matches_loop_reference(kwargs):
    layer = make_layer(**kwargs).eval()
    x = torch.randn(3, TOKENS, DIM, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, TOKENS, DIM, dtype=torch.float64)
    out = layer(x)
    expected, combines = loop_sphero_moe(layer, x)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    dispatch, combine = layer.routing_weights(x)
    torch.testing.assert_close(dispatch.sum(1),
                               torch.ones_like(dispatch.sum(1)))
    torch.testing.assert_close(combine.sum(-1),
                               torch.ones_like(combine.sum(-1)))
    torch.testing.assert_close(
        combine.detach().reshape(-1, combine.shape[-1]),
        torch.stack(combines).detach(), rtol=1e-8, atol=1e-10)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(out, params, grad_out)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    for name, grad, ref in zip(['x', *dict(layer.named_parameters())], grads,
                               expected_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-7, atol=1e-9,
                                   msg=name)
    if kwargs.get('combine') == 'entmax15':
        assert (combine == 0).any()  # entmax is sparse, softmax is not


def test_entmax_combine_equals_the_entmax_package():
    entmax = pytest.importorskip('entmax')
    layer = make_layer(combine='entmax15').eval()
    x = torch.randn(2, TOKENS, DIM, dtype=torch.float64)
    _, combine = layer.routing_weights(x)
    keys = torch.nn.functional.normalize(x, dim=-1, eps=0) * (
        x.norm(dim=-1, keepdim=True) / (x.norm(dim=-1, keepdim=True) + 1e-6))
    q = layer.slot_norm(layer.phi)
    q = q / (q.norm(dim=-1, keepdim=True) + 1e-6)
    logits = torch.einsum('bnd,epd->bnep', keys, q).flatten(2)
    expected = entmax.entmax15(logits / layer.scales[1], dim=-1)
    torch.testing.assert_close(combine, expected, rtol=1e-12, atol=1e-12)


def test_noise_in_training_only():
    layer = make_layer(noise_mult=0.5)
    x = torch.randn(2, TOKENS, DIM, dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    torch.manual_seed(3)
    first = layer(x)
    assert not torch.equal(first, layer(x))
    # The same noise, redrawn from the seed, reproduces the training output.
    torch.manual_seed(3)
    noise = torch.randn(2, TOKENS, CORE + UNIV, SLOTS,
                        dtype=torch.float64) * 0.5
    expected, _ = loop_sphero_moe(layer, x, noise)
    torch.testing.assert_close(first, expected, rtol=1e-9, atol=1e-10)
    assert make_layer().noise_mult == pytest.approx(1 / (CORE + UNIV))


def test_drop_path_drops_whole_samples():
    layer = make_layer(noise_mult=0.0, drop_path_rate=0.5)
    x = torch.randn(16, TOKENS, DIM, dtype=torch.float64)
    reference = layer.eval()(x)
    torch.manual_seed(0)
    out = layer.train()(x)
    kept = [torch.allclose(o, 2 * r) for o, r in zip(out, reference)]
    dropped = [bool((o == 0).all()) for o in out]
    assert all(k != d for k, d in zip(kept, dropped))
    assert 0 < sum(dropped) < 16


def test_every_parameter_gets_a_gradient_and_routing_is_float32():
    layer = make_layer(expert_layer_scale=True, expert_drop=0.1).float()
    layer.train()
    x = torch.randn(2, TOKENS, DIM)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
        dispatch, combine = layer.routing_weights(x)
    assert dispatch.dtype == combine.dtype == torch.float32
    out.float().square().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert layer.univ_experts.w1.shape == (UNIV, DIM, HIDDEN // 4)


def test_entmax_combine_needs_no_entmax_package(monkeypatch):
    monkeypatch.setitem(sys.modules, 'entmax', None)
    layer = make_layer(combine='entmax15').eval()
    x = torch.randn(1, TOKENS, DIM, dtype=torch.float64)
    _, combine = layer.routing_weights(x)
    torch.testing.assert_close(combine.sum(-1), torch.ones(1, TOKENS,
                                                           dtype=x.dtype))


@pytest.mark.parametrize('kwargs,match', [
    (dict(slots_per_expert=0), 'slots_per_expert must be an integer >= 1'),
    (dict(combine='sparsemax'), "got 'sparsemax'"),
    (dict(univ_factor=0.01), 'hidden width of 0'),
    (dict(temperature_init=-0.5), 'must be > 0'),
    (dict(noise_mult=-1.0), 'noise_mult must be >= 0, got -1.0'),
    (dict(drop_path_rate=1.0), r'drop_path_rate must be in \[0, 1\)'),
    (dict(num_universal_experts=-2), 'num_universal_experts must be >= 0'),
    (dict(expert_drop=-0.1), 'dropout'),
])
def test_bad_config(kwargs, match):
    kwargs.setdefault('num_universal_experts', UNIV)
    with pytest.raises(ValueError, match=match):
        SpheroMoE(DIM, HIDDEN, CORE, **kwargs)
