"""SparseMoE: index dispatch against the one-hot einsum reference, gradients,
evaluation-time routing, errors."""
import copy

import pytest
import torch

from moe_plugin.layers import (SparseMoE, compute_capacity,
                               einsum_top_k_combine, einsum_top_k_forward,
                               gshard_loss, importance_loss, load_loss,
                               set_eval_routing)

DIM, HIDDEN, TOKENS = 16, 24, 9


def make_layer(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault('num_experts', 4)
    return SparseMoE(DIM, HIDDEN, **kwargs).double()


def reference_forward(layer, x, top_k, capacity_factor, batch_priority,
                      group_size):
    """The layer's maths through the slow one-hot einsum path."""
    images, tokens, dims = x.shape
    images_per_group = group_size or 1
    groups = x.reshape(images // images_per_group, -1, dims)
    gates = (groups @ layer.router.weight.T).softmax(-1)
    capacity = compute_capacity(groups.shape[1], layer.num_experts, top_k,
                                capacity_factor)
    combine = einsum_top_k_combine(gates, top_k, capacity, batch_priority,
                                   layer.renormalize)
    out = einsum_top_k_forward(groups, combine, layer.experts)
    dropped = 1 - (combine > 0).sum() / (groups.shape[0] * groups.shape[1] *
                                         top_k)
    return out.view_as(x), dropped


@pytest.mark.parametrize(
    'top_k,capacity_factor,group_size,batch_priority,renormalize',
    [(1, 1.0, None, False, False), (1, 0.5, 2, True, False),
     (2, 1.05, None, False, False), (2, 1.05, 3, True, False),
     (2, 0.3, None, True, True), (2, 4.0, 6, False, True),
     (1, 2.0, 3, False, True), (2, 0.6, 2, False, False)])
def test_index_dispatch_equals_einsum_reference(top_k, capacity_factor,
                                                group_size, batch_priority,
                                                renormalize):
    layer = make_layer(
        top_k=top_k,
        capacity_factor=capacity_factor,
        group_size=group_size,
        eval_group_size=group_size,
        batch_priority=batch_priority,
        renormalize=renormalize).eval()
    x = torch.randn(6, TOKENS, DIM, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(6, TOKENS, DIM, dtype=torch.float64)
    out = layer(x)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], grad_out)
    expected, dropped = reference_forward(layer, x, top_k, capacity_factor,
                                          batch_priority, group_size)
    expected_grads = torch.autograd.grad(expected, [x, *layer.parameters()],
                                         grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.moe_metrics['dropped_fraction'],
                               dropped)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize('batch_priority', [False, True])
def test_training_noise_is_noise_std_over_num_experts(batch_priority):
    layer = make_layer(
        top_k=2, capacity_factor=0.8, noise_std=2.0, group_size=2,
        batch_priority=batch_priority).train()
    x = torch.randn(4, TOKENS, DIM, dtype=torch.float64)
    torch.manual_seed(123)
    out = layer(x)
    # The router draws its noise first: redraw it from the same seed.
    groups = x.reshape(2, 2 * TOKENS, DIM)
    logits = groups @ layer.router.weight.T
    torch.manual_seed(123)
    noisy = logits + torch.randn_like(logits) * (2.0 / 4)
    capacity = compute_capacity(2 * TOKENS, 4, 2, 0.8)
    combine = einsum_top_k_combine(noisy.softmax(-1), 2, capacity,
                                   batch_priority)
    expected = einsum_top_k_forward(groups, combine, layer.experts)
    torch.testing.assert_close(out, expected.view_as(x), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(
        layer.moe_metrics['load_loss'],
        load_loss(logits, noisy, 2.0 / 4, 2))
    torch.testing.assert_close(layer.moe_metrics['gshard_loss'],
                               gshard_loss(noisy.softmax(-1)))
    torch.testing.assert_close(layer.moe_metrics['importance_loss'],
                               importance_loss(logits.softmax(-1)))


def test_gradients_reach_every_expert_even_without_tokens():
    layer = make_layer(top_k=1, capacity=4, num_experts=6).train()
    with torch.no_grad():
        # Every token prefers expert 0 then 1: experts 2..5 get no token.
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 50.0
        layer.router.weight[1, 0] = 25.0
    x = torch.randn(4, TOKENS, DIM, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 1
    out = layer(x)
    assert layer.moe_metrics['expert_load'][2:].sum() == 0
    (out.square().sum() + layer.moe_metrics['importance_loss'] +
     layer.moe_metrics['load_loss']).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert layer.experts.w1.grad[0].abs().sum() > 0
    assert layer.experts.w1.grad[2:].abs().sum() == 0
    assert layer.router.weight.grad.abs().sum() > 0


def test_evaluation_is_deterministic_and_training_is_noisy():
    layer = make_layer(top_k=2, capacity_factor=0.5, noise_std=1.0)
    x = torch.randn(4, TOKENS, DIM, dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    assert 'load_loss' not in layer.moe_metrics
    layer.train()
    torch.manual_seed(1)
    first = layer(x)
    assert 'load_loss' in layer.moe_metrics
    assert not torch.equal(first, layer(x))


def test_eval_capacity_factor_changes_dropped_fraction():
    layer = make_layer(
        top_k=2, capacity_factor=1.0, eval_capacity_factor=0.25,
        capacity_multiple_of=1).eval()
    x = torch.randn(8, 16, DIM, dtype=torch.float64)
    layer(x)
    low = layer.moe_metrics['dropped_fraction'].item()
    # E=4, K=2, S=16: B=ceil(16*2*0.25/4)=2 slots per expert, so at least
    # 1 - 4*2 / 32 = 3/4 of the assignments are dropped.
    assert low >= 0.75
    set_eval_routing(layer, capacity_factor=2.0)  # B = 16: nothing dropped
    layer(x)
    assert layer.moe_metrics['dropped_fraction'].item() == 0.0
    layer.train()
    assert layer.routing_options()['capacity_factor'] == 1.0


def test_set_eval_routing_changes_top_k_and_bpr():
    layer = make_layer(top_k=2).eval()
    model = torch.nn.Sequential(layer, torch.nn.Identity())
    assert set_eval_routing(model, top_k=1, batch_priority=True) == 1
    assert layer.routing_options()['top_k'] == 1
    assert layer.routing_options()['batch_priority'] is True
    with pytest.raises(ValueError, match='eval_top_k'):
        set_eval_routing(model, top_k=5)
    with pytest.raises(ValueError, match='unknown'):
        set_eval_routing(model, k=1)


def test_deepcopy_after_training_forward():
    layer = make_layer(top_k=2).train()
    layer(torch.randn(2, TOKENS, DIM, dtype=torch.float64))
    clone = copy.deepcopy(layer)
    assert clone.moe_metrics == {}
    assert 'importance_loss' in layer.moe_metrics


def test_per_image_groups_are_batch_independent():
    layer = make_layer(top_k=2, capacity_factor=0.5, eval_group_size=None)
    layer.eval()
    x = torch.randn(4, TOKENS, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[:1], layer(x[:1]), rtol=0, atol=0)


def test_dropped_token_gets_zero_output():
    layer = make_layer(top_k=1, capacity=1, capacity_multiple_of=1).eval()
    x = torch.randn(1, TOKENS, DIM, dtype=torch.float64)
    out = layer(x)
    kept_tokens = (out.abs().sum(-1) > 0).sum().item()
    assert kept_tokens <= layer.num_experts
    assert layer.moe_metrics['dropped_fraction'].item() == pytest.approx(
        1 - kept_tokens / TOKENS)


def test_expert_choice_matches_loop_reference():
    layer = make_layer(
        router='expert_choice', capacity_factor=1.0,
        capacity_multiple_of=1).eval()
    x = torch.randn(2, TOKENS, DIM, dtype=torch.float64)
    out = layer(x)
    capacity = compute_capacity(TOKENS, 4, 1, 1.0, multiple_of=1)
    expected = torch.zeros_like(x)
    for image in range(2):
        gates = (x[image] @ layer.router.weight.T).softmax(-1)
        for expert in range(4):
            chosen = gates[:, expert].argsort(descending=True)[:capacity]
            for token in chosen.tolist():
                h = x[image, token] @ layer.experts.w1[expert] + \
                    layer.experts.b1[expert]
                y = layer.experts.act(h) @ layer.experts.w2[expert] + \
                    layer.experts.b2[expert]
                expected[image, token] += gates[token, expert] * y
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert 'importance_loss' not in layer.moe_metrics


def test_router_runs_in_float32_under_autocast():
    layer = SparseMoE(DIM, HIDDEN, num_experts=4)
    x = torch.randn(2, TOKENS, DIM)
    seen = {}
    layer.router.register_forward_hook(
        lambda module, args, output: seen.update(
            weights=output[0].combine_weights.dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert seen['weights'] == torch.float32
    assert out.dtype == torch.bfloat16
    assert layer.moe_metrics['importance_loss'].dtype == torch.float32


def test_compiles_as_one_graph():
    layer = SparseMoE(DIM, HIDDEN, num_experts=4, batch_priority=True)
    compiled = torch.compile(layer, backend='eager', fullgraph=True)
    x = torch.randn(2, TOKENS, DIM, requires_grad=True)
    compiled(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize('kwargs,match', [
    (dict(top_k=5), r'top_k must be in \[1, num_experts=4\], got 5'),
    (dict(eval_top_k=0), 'eval_top_k'),
    (dict(capacity_factor=0.0), 'capacity_factor must be > 0'),
    (dict(capacity=0, capacity_multiple_of=1), 'capacity must be > 0'),
    (dict(capacity_factor=None), 'exactly one'),
    (dict(router='hash'), "got 'hash'"),
    (dict(act='relu'), "got 'relu'"),
    (dict(expert_drop=1.0), 'dropout'),
    (dict(group_size=0), 'group_size must be >= 1'),
    (dict(noise_std=-1.0), 'noise_std must be >= 0'),
])
def test_bad_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseMoE(DIM, HIDDEN, num_experts=4, **kwargs)


def test_group_size_must_divide_batch():
    layer = SparseMoE(DIM, HIDDEN, num_experts=4, group_size=4)
    with pytest.raises(ValueError, match='group_size=4 images does not '
                       'divide the batch of 6 images'):
        layer(torch.randn(6, TOKENS, DIM))
