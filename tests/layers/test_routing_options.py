"""SparseMoE's routing options beyond V-MoE, each against a slow float64
reference written from its paper's equations: dropless routing (Tutel,
MegaBlocks), auxiliary-loss-free balancing (arXiv 2408.15664), the cosine
gate (Swin-MoE, arXiv 2206.03382) and Switch's input jitter."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

from moe_plugin.analysis.recording import RoutingRecorder
from moe_plugin.layers import (SparseMoE, einsum_top_k_combine,
                               einsum_top_k_forward, set_eval_routing)
from moe_plugin.layers.routing import Dropless, dispatcher_capacity

DIM, HIDDEN, TOKENS, EXPERTS = 16, 24, 12, 4


def make_layer(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault('num_experts', EXPERTS)
    kwargs.setdefault('noise_std', 0.0)
    return SparseMoE(DIM, HIDDEN, **kwargs).double()


def skewed_tokens(layer, images=4, seed=1):
    """Tokens most of which prefer expert 0."""
    torch.manual_seed(seed)
    x = torch.randn(images, TOKENS, DIM, dtype=torch.float64)
    router = layer.router
    if router.gate == 'linear':
        favourite = router.weight[0].detach()
    else:
        favourite = (router.expert_embeddings[0] @ router.projector.weight
                     ).detach().to(x.dtype)
    return x + 2.0 * favourite / favourite.norm()


def per_token_reference(layer, x, experts_of, weights_of):
    """``y_s = sum_j w_{s,j} f_{e_{s,j}}(x_s)`` one token at a time."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for s in range(flat.shape[0]):
        for e, w in zip(experts_of[s].tolist(), weights_of[s]):
            out[s] += w * layer.experts(
                flat[s].expand(EXPERTS, 1, -1).contiguous())[e, 0]
    return out.view_as(x)


# ----------------------------------------------------------------- dropless


def test_dropless_capacity_against_hand_computed_values():
    slot = torch.tensor([[[0, 2], [1, 0]], [[4, 1], [0, 3]]])
    assert Dropless(4).capacity(slot) == 8  # largest load 5, up to 8
    assert Dropless(1).capacity(slot) == 5
    assert Dropless(0).capacity(slot) == 5
    assert Dropless(2).capacity(slot) == 6


@pytest.mark.parametrize('top_k,group_size,batch_priority,renormalize',
                         [(1, None, False, False), (2, None, True, False),
                          (2, 2, False, True)])
def test_dropless_drops_nothing_and_equals_unbounded_reference(
        top_k, group_size, batch_priority, renormalize):
    layer = make_layer(top_k=top_k, dropless=True, group_size=group_size,
                       eval_group_size=group_size,
                       batch_priority=batch_priority,
                       renormalize=renormalize)
    bounded = make_layer(top_k=top_k, capacity_factor=1.0,
                         group_size=group_size, eval_group_size=group_size)
    x = skewed_tokens(layer).requires_grad_()
    bounded.train()(x)
    assert bounded.moe_metrics['dropped_fraction'] > 0.1  # skewed
    for mode in ('train', 'eval'):
        getattr(layer, mode)()
        out = layer(x)
        assert layer.moe_metrics['dropped_fraction'] == 0, mode
        groups = x.reshape(x.shape[0] // (group_size or 1), -1, DIM)
        gates = (groups @ layer.router.weight.T).softmax(-1)
        # Unbounded: every token fits in any expert (B = S).
        combine = einsum_top_k_combine(gates, top_k, groups.shape[1],
                                       batch_priority, renormalize)
        expected = einsum_top_k_forward(groups, combine,
                                        layer.experts).view_as(x)
        torch.testing.assert_close(out, expected, msg=mode)
        grads = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(
            grads, torch.autograd.grad(expected.square().sum(), x))


def test_dropless_capacity_is_the_largest_load_rounded_up():
    layer = make_layer(top_k=2, dropless=True, capacity_multiple_of=4)
    seen = {}
    layer.router.register_forward_hook(
        lambda router, args, output: seen.update(
            capacity=dispatcher_capacity(output[0], args[0].shape[0])))
    x = skewed_tokens(layer)
    layer.eval()(x)
    gates = layer.router.logits(x).softmax(-1)
    chosen = gates.topk(2, dim=-1).indices  # [images, S, K]
    largest = max(int((chosen[i] == e).sum()) for i in range(x.shape[0])
                  for e in range(EXPERTS))
    assert seen['capacity'] == largest + (-largest) % 4
    assert layer.capacity_for(TOKENS) is None
    assert isinstance(layer.router_arguments(TOKENS)['capacity'], Dropless)


def test_dropless_compiles_with_its_host_sync():
    # torch 2.14's Dynamo traces the capacity's ``.item()`` as an unbacked
    # integer under fullgraph=True; the host sync stays, and the buffer's
    # shape follows the data.
    layer = make_layer(top_k=1, dropless=True, capacity_multiple_of=1).float()
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
    capacities = set()
    torch.manual_seed(4)
    for x in (torch.randn(4, TOKENS, DIM), skewed_tokens(layer).float()):
        x = x.requires_grad_()
        out = compiled(x)
        grad = torch.autograd.grad(out.square().sum(), x)[0]
        expected = layer(x)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(
            grad, torch.autograd.grad(expected.square().sum(), x)[0])
        capacities.add(layer.router(
            x.detach(), **layer.router_arguments(TOKENS))[0].slot_token
            .shape[1])
    assert len(capacities) == 2  # two different data-dependent shapes


# ------------------------------------------------------------ bias balancing


def reference_bias_step(bias, gates, top_k, rate):
    """arXiv 2408.15664: choose by ``g + b``; ``b += u sign(mean c - c)``."""
    chosen = (gates + bias).topk(top_k, dim=-1).indices
    load = torch.stack([(chosen == e).sum() for e in range(EXPERTS)]).to(
        bias.dtype)
    return bias + rate * torch.sign(load.mean() - load), chosen


def test_bias_update_follows_the_paper_and_lowers_the_overloaded_expert():
    layer = make_layer(top_k=2, bias_balancing=True, bias_update_rate=0.01,
                       capacity_factor=4.0)
    bias = torch.zeros(EXPERTS, dtype=torch.float64)
    x = skewed_tokens(layer)
    for step in range(5):
        gates = (x @ layer.router.weight.T).softmax(-1)
        bias, _ = reference_bias_step(bias, gates, 2, 0.01)
        layer.train()(x)
        torch.testing.assert_close(layer.router.expert_bias.double(), bias,
                                   msg=f'step {step}')
    assert layer.router.expert_bias[0] < 0  # expert 0 is overloaded
    # Evaluation does not move the bias.
    before = layer.router.expert_bias.clone()
    layer.eval()(x)
    assert torch.equal(layer.router.expert_bias, before)


def test_bias_chooses_the_experts_but_never_weights_them():
    layer = make_layer(top_k=2, bias_balancing=True, capacity_factor=4.0)
    bias = torch.tensor([0.0, 0.3, -0.2, 0.5])
    layer.router.expert_bias.copy_(bias)
    x = skewed_tokens(layer, images=2)
    out = layer.eval()(x)
    gates = (x @ layer.router.weight.T).softmax(-1).reshape(-1, EXPERTS)
    chosen = (gates + bias.double()).topk(2, dim=-1).indices
    weights = gates.gather(-1, chosen)  # the unbiased gates
    expected = per_token_reference(layer, x, chosen, weights)
    torch.testing.assert_close(out, expected)
    # The bias changed the choice (else this test would prove nothing).
    assert not torch.equal(chosen, gates.topk(2, dim=-1).indices)
    combine = layer.router(x, **layer.router_arguments(TOKENS))[0]
    torch.testing.assert_close(
        combine.combine_weights.reshape(-1, 2), weights)


def _train(layer, steps, aux_weight, data):
    """Adam on a regression task (which cares nothing for the balance);
    the mean load CV of the last 20 steps."""
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    torch.manual_seed(3)
    target = torch.nn.Linear(DIM, DIM).double()
    cvs = []
    for step in range(steps):
        x = data[step % len(data)]
        loss = F.mse_loss(layer(x), target(x).detach())
        metrics = layer.moe_metrics
        loss = loss + aux_weight * (metrics['importance_loss'] +
                                    metrics['load_loss'])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        load = metrics['expert_load']
        cvs.append(float(load.std(unbiased=False) / load.mean()))
    return sum(cvs[-20:]) / 20, cvs[0]


def test_bias_balancing_balances_better_than_the_auxiliary_losses():
    kwargs = dict(top_k=2, noise_std=1.0, capacity_factor=1.05)
    probe = make_layer(**kwargs)
    favourite = probe.router.weight[0].detach()
    data = []
    for seed in range(4):
        torch.manual_seed(10 + seed)
        data.append(torch.randn(8, TOKENS, DIM, dtype=torch.float64) +
                    4.0 * favourite / favourite.norm())
    # V-MoE's auxiliary losses at their weights vs the bias alone.
    aux_cv, start_cv = _train(make_layer(**kwargs), 60, 0.005, data)
    bias_cv, bias_start_cv = _train(
        make_layer(bias_balancing=True, bias_update_rate=1e-2, **kwargs),
        60, 0.0, data)
    assert start_cv == bias_start_cv and start_cv > 0.5  # skewed at first
    assert bias_cv < aux_cv / 2, (bias_cv, aux_cv)
    assert bias_cv < 0.15, bias_cv


def test_bias_survives_save_and_resume():
    layer = make_layer(top_k=2, bias_balancing=True, bias_update_rate=0.01)
    x = skewed_tokens(layer)
    for _ in range(3):
        layer.train()(x)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_layer(top_k=2, bias_balancing=True,
                         bias_update_rate=0.01)
    resumed.load_state_dict(torch.load(buffer))
    assert torch.equal(resumed.router.expert_bias, layer.router.expert_bias)
    assert resumed.router.expert_bias.abs().sum() > 0
    layer(x)
    resumed.train()(x)
    assert torch.equal(resumed.router.expert_bias, layer.router.expert_bias)
    # A checkpoint made without balancing starts the bias at zero.
    plain = make_layer(top_k=2).state_dict()
    assert 'router.expert_bias' not in plain
    resumed.load_state_dict(plain)
    assert not resumed.router.expert_bias.any()


def test_bias_survives_an_mmengine_checkpoint(tmp_path):
    from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint

    from moe_plugin.models.backbones import VisionMoE

    def build():
        torch.manual_seed(0)
        return VisionMoE(
            arch=dict(embed_dims=DIM, num_layers=2, num_heads=2,
                      feedforward_channels=HIDDEN), img_size=8,
            patch_size=4, moe_layers=[1],
            moe_cfg=dict(type='SparseMoE', num_experts=EXPERTS,
                         bias_balancing=True, bias_update_rate=0.01))

    model = build()
    model.train()  # MMPretrain's backbones return None from train()
    for seed in range(3):
        torch.manual_seed(seed)
        model(torch.randn(4, 3, 8, 8))
    bias = model.layers[1].ffn.router.expert_bias
    assert bias.abs().sum() > 0
    save_checkpoint(model.state_dict(), str(tmp_path / 'ckpt.pth'))
    resumed = build()
    load_checkpoint(resumed, str(tmp_path / 'ckpt.pth'), strict=True)
    assert torch.equal(resumed.layers[1].ffn.router.expert_bias, bias)


# --------------------------------------------------------------- cosine gate


def reference_cosine_logits(router, x):
    """Swin-MoE: ``s * cos(W_p x + b_p, m_e)``, ``s = min(exp(t), 100)``."""
    x = x.double()
    projected = x @ router.projector.weight.double().T + \
        router.projector.bias.double()
    logits = torch.empty(*x.shape[:-1], EXPERTS, dtype=torch.float64)
    scale = min(math.exp(float(router.logit_scale)), 100.0)
    for e in range(EXPERTS):
        m = router.expert_embeddings[e].double()
        logits[..., e] = scale * (projected @ m) / (
            projected.norm(dim=-1) * m.norm())
    return logits


def test_cosine_gate_logits_against_the_formula():
    layer = make_layer(gate='cosine', gate_dim=8)
    router = layer.router
    assert set(dict(router.named_parameters())) == {
        'projector.weight', 'projector.bias', 'expert_embeddings',
        'logit_scale'}
    assert router.projector.out_features == 8
    torch.testing.assert_close(float(router.logit_scale.detach().exp()),
                               1 / 0.07)
    x = torch.randn(3, TOKENS, DIM, dtype=torch.float64)
    torch.testing.assert_close(router.logits(x),
                               reference_cosine_logits(router, x))
    # The scale is clamped at 1 / 0.01 (Swin-MoE), and then gets no grad.
    with torch.no_grad():
        router.logit_scale.fill_(math.log(1000.0))
    logits = router.logits(x)
    torch.testing.assert_close(logits, reference_cosine_logits(router, x))
    assert logits.abs().max() <= 100.0 + 1e-9
    assert SparseMoE(DIM, HIDDEN, gate='cosine').router.projector \
        .out_features == 256


def test_cosine_gate_layer_equals_the_reference_and_trains():
    layer = make_layer(gate='cosine', top_k=2, capacity_factor=1.0)
    x = torch.randn(2, TOKENS, DIM, dtype=torch.float64)
    out = layer.eval()(x)
    gates = reference_cosine_logits(layer.router, x).softmax(-1)
    capacity = layer.capacity_for(TOKENS)
    expected = einsum_top_k_forward(
        x, einsum_top_k_combine(gates, 2, capacity), layer.experts)
    torch.testing.assert_close(out, expected)
    layer.train()(x).sum().backward()
    for name, param in layer.router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# -------------------------------------------------------------------- jitter


def test_jitter_multiplies_the_router_input_in_training_only():
    eps = 0.1
    layer = make_layer(jitter=eps)
    plain = make_layer()
    x = torch.randn(2, TOKENS, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer.eval()(x), plain.eval()(x))
    router = layer.router.train()
    torch.manual_seed(5)
    jittered = router.routing_logits(x)
    torch.manual_seed(5)
    noise = torch.empty_like(x).uniform_(1 - eps, 1 + eps)
    torch.testing.assert_close(jittered, (x * noise) @ router.weight.T)
    assert not torch.allclose(jittered, x @ router.weight.T)
    assert noise.min() >= 1 - eps and noise.max() <= 1 + eps
    torch.testing.assert_close(router.eval().routing_logits(x),
                               x @ router.weight.T)


# ----------------------------------------------- compile, seams and errors


@pytest.mark.parametrize('kwargs', [
    dict(bias_balancing=True), dict(gate='cosine'), dict(jitter=0.05),
    dict(router='expert_choice', gate='cosine', jitter=0.05)])
def test_compiles_as_one_graph(kwargs):
    torch.manual_seed(0)
    layer = SparseMoE(DIM, HIDDEN, num_experts=EXPERTS, **kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend='eager', fullgraph=True)
    x = torch.randn(2, TOKENS, DIM, requires_grad=True)
    compiled(x).sum().backward()
    assert x.grad is not None
    if kwargs.get('bias_balancing'):
        assert layer.router.expert_bias.abs().sum() > 0
    layer.eval()
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize('kwargs', [
    dict(dropless=True, top_k=2), dict(bias_balancing=True, top_k=2),
    dict(gate='cosine', top_k=2), dict(jitter=0.05, top_k=2)])
def test_recorder_and_eval_routing_keep_working(kwargs):
    layer = make_layer(capacity_factor=0.5, **kwargs)
    x = skewed_tokens(layer, images=2)
    if kwargs.get('bias_balancing'):
        layer.train()(x)  # the bias moves in training only
        assert layer.router.expert_bias.abs().sum() > 0
        # A bias that changes the choices, so that it must be recorded.
        layer.router.expert_bias.copy_(torch.tensor([-0.5, 0.2, 0.0, 0.4]))
    layer.eval()
    assert set_eval_routing(layer, top_k=1, capacity_factor=0.5) == 1
    with RoutingRecorder(layer, {'moe': layer}) as recorder:
        layer(x)
    record = recorder.last['moe']
    dispatcher = layer.router(x, **layer.router_arguments(TOKENS))[0]
    torch.testing.assert_close(record.weights.sum(-1).reshape(-1),
                               dispatcher.combine_weights.sum(-1))
    dropped = layer.moe_metrics['dropped_fraction']
    torch.testing.assert_close(
        torch.tensor(1 - record.processed / record.pairs,
                     dtype=dropped.dtype), dropped)
    assert (dropped == 0) == bool(kwargs.get('dropless'))


@pytest.mark.parametrize('kwargs,match', [
    (dict(bias_update_rate=-1e-3, bias_balancing=True),
     'bias_update_rate must be a number >= 0'),
    (dict(gate='dot'), r"gate must be one of \('linear', 'cosine'\), "
     "got 'dot'"),
    (dict(jitter=-0.1), 'jitter must be a number >= 0'),
    (dict(jitter=1.0), 'jitter must be a number >= 0.0 and < 1.0'),
    (dict(gate='cosine', init_temperature=0.0),
     'init_temperature must be a number > 0'),
    (dict(gate='cosine', gate_dim=0), 'gate_dim must be an int >= 1'),
    (dict(dropless='yes'), "dropless must be True or False, got 'yes'"),
    (dict(dropless=True, router='expert_choice'),
     "dropless=True needs router='token_choice'"),
    (dict(bias_balancing=True, router='expert_choice'),
     "bias_balancing=True needs router='token_choice'"),
])
def test_bad_values_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseMoE(DIM, HIDDEN, num_experts=EXPERTS, **kwargs)


def test_options_reach_every_backbone_through_moe_cfg():
    from mmpretrain.models.backbones import ConvNeXt

    from moe_plugin.models.backbones import ConvNeXtMoE, VisionMoE
    del ConvNeXt  # ConvNeXtMoE's base, imported for its registration
    moe_cfg = dict(type='SparseMoE', num_experts=EXPERTS, dropless=True,
                   bias_balancing=True, gate='cosine', jitter=0.01)
    vit = VisionMoE(
        arch=dict(embed_dims=DIM, num_layers=2, num_heads=2,
                  feedforward_channels=HIDDEN), img_size=8, patch_size=4,
        moe_layers=[1], moe_cfg=moe_cfg)
    router = vit.layers[1].ffn.router
    assert (router.gate, router.jitter, router.bias_balancing) == (
        'cosine', 0.01, True)
    assert vit.layers[1].ffn.dropless
    arch = dict(depths=[1, 1, 1, 1], channels=[8, 8, 8, 8])
    ConvNeXtMoE(arch=arch, moe_blocks=[[], [], [], [0]], moe_cfg=moe_cfg)
    with pytest.raises(ValueError, match='with_cp=True cannot be combined '
                       'with moe_cfg bias_balancing=True'):
        ConvNeXtMoE(arch=arch, moe_blocks=[[], [], [], [0]],
                    moe_cfg=moe_cfg, with_cp=True)
