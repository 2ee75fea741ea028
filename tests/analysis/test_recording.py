"""RoutingRecorder against the layers' own outputs."""
import pytest
import torch

from moe_plugin.analysis import (RoutingRecorder, find_moe_layers,
                                 select_moe_layers)
from moe_plugin.layers import SoftMoE, SparseMoE, SpheroMoE
from moe_plugin.models import VisionMoE


def expert_outputs(experts, x):
    """``[N, E, D]``: every expert applied to every token (slow, obvious)."""
    return torch.stack([
        torch.nn.functional.gelu(
            x @ experts.w1[e] + experts.b1[e], approximate='tanh') @
        experts.w2[e] + experts.b2[e] for e in range(experts.num_experts)
    ], 1)


@pytest.mark.parametrize('cfg', [
    dict(router='token_choice', top_k=2, eval_capacity_factor=0.5),
    dict(router='token_choice', top_k=1, eval_capacity_factor=0.25,
         eval_batch_priority=True),
    dict(router='token_choice', top_k=2, eval_capacity_factor=1.0,
         eval_group_size=2),
    dict(router='expert_choice', eval_capacity_factor=1.0),
])
def test_recorded_weights_rebuild_the_sparse_layer_output(cfg):
    torch.manual_seed(0)
    layer = SparseMoE(16, 32, num_experts=4, **cfg)
    layer.eval()
    x = torch.randn(4, 9, 16)
    with torch.no_grad(), RoutingRecorder(layer, {'moe': layer}) as rec:
        out = layer(x)
    routing = rec.last['moe']
    assert routing.weights.shape == (4, 9, 4)
    # y_n = sum_e weights[n, e] * f_e(x_n): the recorded weights are the
    # ones the layer combined with.
    outputs = expert_outputs(layer.experts, x.reshape(-1, 16))
    rebuilt = (routing.weights.reshape(-1, 4, 1) * outputs).sum(1)
    torch.testing.assert_close(rebuilt.view_as(out), out, rtol=1e-5,
                               atol=1e-6)
    assert torch.equal(routing.taken, routing.weights > 0)
    torch.testing.assert_close(routing.probs.sum(-1),
                               torch.ones(4, 9))
    metrics = layer.moe_metrics
    if cfg['router'] == 'token_choice':
        # Kept + dropped = the K choices; dropped share as the router's.
        choices = routing.taken.sum(-1) + routing.dropped.sum(-1)
        assert (choices == cfg['top_k']).all()
        assert routing.pairs == 4 * 9 * cfg['top_k']
        assert 1 - routing.processed / routing.pairs == pytest.approx(
            metrics['dropped_fraction'].item())
    else:
        assert routing.dropped is None
        assert 1 - routing.processed / routing.pairs == pytest.approx(
            metrics['dropped_fraction'].item())


@pytest.mark.parametrize('layer_cls, kwargs', [
    (SoftMoE, dict(num_experts=3, slots_per_expert=2)),
    (SpheroMoE, dict(num_experts=2, num_universal_experts=2,
                     slots_per_expert=2)),
])
def test_soft_records_are_the_routing_weights(layer_cls, kwargs):
    torch.manual_seed(0)
    layer = layer_cls(16, 32, **kwargs)
    layer.eval()
    x = torch.randn(2, 9, 16)
    with RoutingRecorder(layer, {'moe': layer}) as rec:
        layer(x)
    routing = rec.last['moe']
    dispatch, combine = layer.routing_weights(x)
    experts = layer.num_experts
    torch.testing.assert_close(routing.dispatch, dispatch.sum(-1))
    torch.testing.assert_close(routing.weights,
                               combine.view(2, 9, experts, 2).sum(-1))
    # Each expert's 2 slots take a full share of the tokens each.
    torch.testing.assert_close(routing.dispatch.sum(1),
                               torch.full((2, experts), 2.0))
    assert routing.kind == 'soft' and routing.taken is None


def test_recorder_needs_eval_mode_and_removes_its_hooks():
    layer = SparseMoE(8, 16, num_experts=2, top_k=1)
    with pytest.raises(RuntimeError, match='model.eval()'):
        with RoutingRecorder(layer, {'moe': layer}):
            layer(torch.randn(1, 4, 8))
    assert not layer._forward_pre_hooks and not layer.router._forward_hooks


def test_find_and_select_layers():
    model = VisionMoE(
        arch=dict(embed_dims=8, num_layers=4, num_heads=2,
                  feedforward_channels=16),
        img_size=8, patch_size=4, moe_layers=[1, 3],
        moe_cfg=dict(type='SparseMoE', num_experts=2, top_k=1))
    assert list(find_moe_layers(model)) == ['layers.1.ffn', 'layers.3.ffn']
    assert list(select_moe_layers(model, ['3', 'layers.1.ffn'])) == [
        'layers.3.ffn', 'layers.1.ffn']
    with pytest.raises(ValueError, match='layer 2 is not an MoE layer'):
        select_moe_layers(model, [2])
    dense = VisionMoE(
        arch=dict(embed_dims=8, num_layers=2, num_heads=2,
                  feedforward_channels=16),
        img_size=8, patch_size=4, moe_layers=[])
    with pytest.raises(ValueError, match='has no MoE layer'):
        select_moe_layers(dense)


def test_recorder_notices_a_router_it_no_longer_matches(monkeypatch):
    import moe_plugin.analysis.recording as recording
    from moe_plugin.layers import assign_top_k
    torch.manual_seed(0)
    layer = SparseMoE(16, 32, num_experts=4, top_k=1,
                      eval_capacity_factor=0.25)
    layer.eval()
    # A recomputation that serves tokens in another order than the router.
    monkeypatch.setattr(
        recording, 'assign_top_k',
        lambda gates, k, capacity, bpr, renorm, **options: assign_top_k(
            gates, k, capacity, not bpr, renorm, **options))
    with pytest.raises(RuntimeError, match='disagrees with its dispatcher'):
        with RoutingRecorder(layer, {'moe': layer}):
            layer(torch.randn(2, 64, 16))
