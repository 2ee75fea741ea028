"""Our sort-free entmax-1.5 against a sort-based reference written out here
and against the ``entmax`` package (outputs and gradients)."""
import pytest
import torch

from moe_plugin.layers.entmax import entmax15


def sorted_entmax15(x):
    """entmax-1.5 over the last dim by sorting (the package's algorithm,
    written plainly): the threshold of the largest consistent support."""
    z = (x - x.max(-1, keepdim=True).values) / 2
    zs = z.sort(-1, descending=True).values
    rho = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    mean = zs.cumsum(-1) / rho
    mean_sq = zs.square().cumsum(-1) / rho
    tau = mean - ((1 - rho * (mean_sq - mean**2)) / rho).clamp(min=0).sqrt()
    size = (tau <= zs).sum(-1, keepdim=True)
    return (z - tau.gather(-1, size - 1)).clamp(min=0).square()


def logits(rows, n, scale, dtype=torch.float64, seed=0):
    """Cosine-similarity logits like SpheroMoE's (scaled, plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(
        torch.randn(rows, 16, generator=gen, dtype=dtype), dim=-1)
    slots = torch.nn.functional.normalize(
        torch.randn(n, 16, generator=gen, dtype=dtype), dim=-1)
    noise = torch.randn(rows, n, generator=gen, dtype=dtype) / n
    return keys @ slots.T * scale + noise


@pytest.mark.parametrize('scale', [0.1, 2.0, 20.0, 1e3])
@pytest.mark.parametrize('n', [1, 2, 7, 294])
def test_equals_the_sorted_reference_in_float64(n, scale, device):
    x = logits(64, n, scale).to(device).requires_grad_()
    grad_out = torch.randn(64, n, dtype=torch.float64, device=device)
    out = entmax15(x)
    expected = sorted_entmax15(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.sum(-1), torch.ones_like(out[:, 0]))
    grad, = torch.autograd.grad(out, x, grad_out)
    expected_grad, = torch.autograd.grad(expected, x, grad_out)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)


def test_sparse_ties_masked_entries_and_other_dims():
    x = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, -float('inf')],
                      [1.0, 1.0, -3.0]], dtype=torch.float64)
    torch.testing.assert_close(entmax15(x), sorted_entmax15(x))
    assert entmax15(x)[1].tolist() == [1.0, 0.0, 0.0]
    y = logits(12, 5, 3.0).view(3, 4, 5)
    torch.testing.assert_close(
        entmax15(y, dim=1),
        sorted_entmax15(y.transpose(1, 2)).transpose(1, 2))
    with pytest.raises(ValueError, match='empty dim'):
        entmax15(torch.zeros(2, 0))


def test_gradcheck():
    x = logits(6, 9, 4.0).requires_grad_()
    assert torch.autograd.gradcheck(entmax15, (x, ))


@pytest.mark.parametrize('dtype,atol', [(torch.float64, 1e-12),
                                        (torch.float32, 1e-6)])
@pytest.mark.parametrize('scale', [2.0, 20.0])
def test_equals_the_entmax_package(dtype, atol, scale, device):
    package = pytest.importorskip('entmax')
    x = logits(197 * 2, 294, scale, dtype).to(device).requires_grad_()
    grad_out = torch.randn(197 * 2, 294, dtype=dtype, device=device)
    out = entmax15(x)
    expected = package.entmax15(x, dim=-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    grad, = torch.autograd.grad(out, x, grad_out)
    expected_grad, = torch.autograd.grad(expected, x, grad_out)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=10 * atol)
