"""SpheroMoE's single path (``single_scale=True``) against a slow loop of
MoE Jetpack's ``SoftMoELayerWrapper`` equations."""
import pytest
import torch

from moe_plugin.layers import SpheroMoE

DIM, HIDDEN, TOKENS, EXPERTS, SLOTS = 8, 16, 5, 3, 2


def loop_single_path(layer, x, slot_layernorm):
    """One image, token and slot at a time (float64).

    With the slot LayerNorm: keys raw, queries ``LN(phi) * scale``; without:
    keys ``x / (|x| + 1e-6)``, queries ``phi / (|phi| + 1e-6) * scale``.
    Softmax dispatch over tokens, softmax combine over all slots.
    """
    out = torch.zeros_like(x)
    experts = layer.core_experts
    for b in range(x.shape[0]):
        logit = {}
        for e in range(EXPERTS):
            for j in range(SLOTS):
                q = layer.phi[e, j]
                if slot_layernorm:
                    q = (q - q.mean()) / torch.sqrt(
                        (q - q.mean()).square().mean() + 1e-5)
                    q = q * layer.slot_norm.weight + layer.slot_norm.bias
                else:
                    q = q / (torch.sqrt(q.square().sum()) + 1e-6)
                q = q * layer.scale
                for m in range(TOKENS):
                    k = x[b, m]
                    if not slot_layernorm:
                        k = k / (torch.sqrt(k.square().sum()) + 1e-6)
                    logit[m, e, j] = k @ q
        slot_out = {}
        for e in range(EXPERTS):
            for j in range(SLOTS):
                w = torch.stack([logit[m, e, j] for m in range(TOKENS)])
                w = w.softmax(0)
                v = sum(w[m] * x[b, m] for m in range(TOKENS))
                if layer.scale_in is not None:
                    v = v * layer.scale_in[0].gamma + layer.scale_in[0].beta
                h = experts.act(v @ experts.w1[e] + experts.b1[e])
                y = h @ experts.w2[e] + experts.b2[e]
                if layer.scale_out is not None:
                    y = y * layer.scale_out[0].gamma + layer.scale_out[0].beta
                slot_out[e, j] = y
        for m in range(TOKENS):
            row = torch.stack([logit[m, e, j] for e in range(EXPERTS)
                               for j in range(SLOTS)]).softmax(0)
            out[b, m] = sum(row[e * SLOTS + j] * slot_out[e, j]
                            for e in range(EXPERTS) for j in range(SLOTS))
    return out


@pytest.mark.parametrize('slot_layernorm', [True, False])
def test_single_path_matches_loop(slot_layernorm):
    torch.manual_seed(0)
    layer = SpheroMoE(
        DIM, HIDDEN, EXPERTS, slots_per_expert=SLOTS,
        slot_layernorm=slot_layernorm, normalize_keys=not slot_layernorm,
        normalize_queries=not slot_layernorm, single_scale=True,
        expert_layer_scale=True).double().eval()
    with torch.no_grad():
        layer.scale.fill_(2.5)
        for p in layer.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    assert not hasattr(layer, 'scales') or layer.scales is None
    x = torch.randn(2, TOKENS, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer(x), loop_single_path(layer, x,
                                                          slot_layernorm))


def test_single_scale_gets_a_gradient_and_has_no_temperatures():
    layer = SpheroMoE(DIM, HIDDEN, EXPERTS, single_scale=True)
    layer(torch.randn(2, TOKENS, DIM)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(AttributeError, match='no temperatures'):
        layer.temperatures()
