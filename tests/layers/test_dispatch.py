"""The index dispatcher's weighted choice sum against the plain formula."""
import pytest
import torch

from moe_plugin.layers.dispatch import (token_choice_dispatcher,
                                        weighted_choice_sum)


@pytest.mark.parametrize('top_k', [1, 2])
def test_weighted_choice_sum_is_bitwise_the_reduction(top_k):
    torch.manual_seed(0)
    values = torch.randn(37, top_k, 24)
    weights = torch.rand(37, top_k)
    expected = (values * weights.unsqueeze(-1)).sum(1)
    assert torch.equal(weighted_choice_sum(values, weights), expected)


def test_weighted_choice_sum_many_choices_float64():
    torch.manual_seed(0)
    values = torch.randn(19, 5, 8, dtype=torch.float64)
    weights = torch.rand(19, 5, dtype=torch.float64)
    expected = (values * weights.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(weighted_choice_sum(values, weights),
                               expected, rtol=1e-15, atol=1e-15)


def _one_hot_reference(x, expert_index, slot, kept, weights, capacity,
                       num_experts, run):
    """Dispatch and combine as dense one-hot tensors (the V-MoE einsum)."""
    groups, group_tokens, top_k = expert_index.shape
    mask = (torch.nn.functional.one_hot(expert_index, num_experts)[
        ..., None] * torch.nn.functional.one_hot(
            slot.clamp(max=capacity - 1), capacity)[..., None, :]).to(
                x.dtype) * kept[..., None, None].to(x.dtype)
    dispatch = mask.sum(2)  # [G, S, E, B]
    combine = (mask * weights[..., None, None]).sum(2)
    xg = x.view(groups, group_tokens, -1)
    buffer = torch.einsum('gsec,gsd->egcd', dispatch, xg)
    out = run(buffer.reshape(num_experts, groups * capacity, -1))
    out = out.view(num_experts, groups, capacity, -1)
    return torch.einsum('gsec,egcd->gsd', combine, out).reshape(
        -1, x.shape[-1])


@pytest.mark.parametrize('top_k', [1, 2, 3])
def test_dispatch_and_combine_match_one_hot_float64(top_k):
    """Outputs and gradients (tokens, weights, experts) in float64."""
    torch.manual_seed(top_k)
    groups, group_tokens, num_experts, capacity, dims = 2, 12, 4, 5, 6
    logits = torch.randn(groups, group_tokens, num_experts)
    expert_index = logits.topk(top_k, -1).indices
    # Position of each choice in its expert's buffer, choice-major (as the
    # routers do), some of them over capacity.
    one_hot = torch.nn.functional.one_hot(expert_index, num_experts)
    order = one_hot.transpose(1, 2).reshape(groups, -1, num_experts)
    slot = ((order.cumsum(1) - 1) * order).sum(-1).view(
        groups, top_k, group_tokens).transpose(1, 2)
    kept = slot < capacity
    assert not kept.all() and kept.any()
    weight_src = torch.rand(groups, group_tokens, top_k,
                            dtype=torch.float64)
    w_expert = torch.randn(num_experts, dims, dims, dtype=torch.float64)
    x_src = torch.randn(groups * group_tokens, dims, dtype=torch.float64)

    def run(buffer, w):
        return torch.bmm(buffer, w).tanh()

    def forward(index_path):
        x = x_src.clone().requires_grad_()
        weights = weight_src.clone().requires_grad_()
        w = w_expert.clone().requires_grad_()
        if index_path:
            dispatcher = token_choice_dispatcher(
                expert_index, slot, kept, weights, capacity, num_experts)
            y = dispatcher.combine(run(dispatcher.dispatch(x), w))
        else:
            y = _one_hot_reference(x, expert_index, slot, kept, weights,
                                   capacity, num_experts,
                                   lambda b: run(b, w))
        y.backward(torch.cos(torch.arange(y.numel(),
                                          dtype=y.dtype)).view_as(y))
        return y, x.grad, weights.grad, w.grad

    for got, want in zip(forward(True), forward(False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
