"""Exact entmax-1.5 without a sort: Newton's method on the threshold.

entmax-1.5 (Peters et al., "Sparse Sequence-to-Sequence Models", ACL 2019)
maps logits ``x`` to ``p_i = max(z_i - tau, 0)^2`` with ``z = (x - max x) /
2`` and the threshold ``tau`` such that ``sum p = 1``. The ``entmax``
package finds ``tau`` by sorting every row (``O(n log n)`` and the slowest
part on a CPU). Here ``h(t) = sum max(z_i - t, 0)^2`` is convex and
decreasing on ``t < 0 = max z``, so Newton's method on ``h(t) = 1``
converges monotonically from the left of ``tau`` (after at most one step
from the right) with no sort:

1. start from the threshold of the full support, ``mean - sqrt((1 - n var)
   / n)`` (clamped at ``mean``), computed on ``z`` clamped at -1 (no
   element below ``-1 <= tau`` is ever in the support, and the clamp keeps
   ``-inf`` out);
2. Newton steps ``t += (h(t) - 1) / (2 sum max(z_i - t, 0))`` on each row
   until it moves by no more than ``1e-7 (1 + |t|)`` (3 to 9 steps for 294
   slots; once few rows still move they are gathered, so the late steps are
   cheap);
3. the exact threshold on the support ``{z_i > t}`` found (a superset of
   the true one by at most elements within round-off of ``tau``, which
   contribute nothing): the closed form of the ``entmax`` package for its
   support size.

The backward is the package's: with ``s = sqrt(p) = max(z - tau, 0)``,
``dx = s * dp - s * sum(s * dp) / sum(s)``; ``s`` is saved, not ``p``, so
the backward takes no square root.
"""
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

#: Newton steps before giving up on a row (never reached in practice: the
#: convergence is quadratic once left of the threshold).
MAX_NEWTON_STEPS = 50


def _full_support_threshold(z: Tensor) -> Tensor:
    """Threshold ``[..., 1]`` solving ``sum (z_i - t)^2 = 1`` over a row."""
    n = z.shape[-1]
    mean = z.mean(-1, keepdim=True)
    var = torch.linalg.vecdot(z, z).unsqueeze(-1) / n - mean * mean
    return mean - ((1 - n * var) / n).clamp_min(0).sqrt()


def _support_threshold(z: Tensor, support: Tensor) -> Tensor:
    """The same closed form over the ``support`` elements of each row."""
    size = support.sum(-1, keepdim=True).to(z.dtype)
    kept = torch.where(support, z, 0.0)
    mean = kept.sum(-1, keepdim=True) / size
    mean_sq = torch.linalg.vecdot(kept, kept).unsqueeze(-1) / size
    spread = size * (mean_sq - mean * mean)
    return mean - ((1 - spread) / size).clamp_min(0).sqrt()


def entmax15_threshold(z: Tensor) -> Tensor:
    """``tau`` with ``sum max(z - tau, 0)^2 = 1`` over the last dim.

    Once fewer than half of the rows still move, Newton steps continue on
    those rows only (after three steps typically a few percent of them).

    Args:
        z (Tensor): ``[..., n]`` half logits shifted so that each row's
            maximum is 0.

    Returns:
        Tensor: ``[..., 1]``.
    """
    z_floor = z.clamp_min(-1.0).reshape(-1, z.shape[-1])
    t = _full_support_threshold(z_floor)
    rows = None  # the rows of ``z_floor`` still moving; None for all
    active_z, active_t = z_floor, t
    for _ in range(MAX_NEWTON_STEPS):
        s = (active_z - active_t).clamp_min_(0)
        excess = torch.linalg.vecdot(s, s).unsqueeze(-1) - 1
        step = excess / (2 * s.sum(-1, keepdim=True))
        active_t = active_t + step
        moving = (step.abs() > 1e-7 * (1 + active_t.abs())).squeeze(-1)
        if rows is None:
            t = active_t
        else:
            t = t.index_copy(0, rows, active_t)
        still = int(moving.sum())
        if still == 0:
            break
        if 2 * still > moving.numel():
            continue  # gathering most rows would cost more than it saves
        keep = moving.nonzero().squeeze(-1)
        rows = keep if rows is None else rows[keep]
        active_z, active_t = active_z[keep], active_t[keep]
    t = t.view(*z.shape[:-1], 1)
    return _support_threshold(z, z > t)


class Entmax15(torch.autograd.Function):
    """entmax-1.5 over the last dim; see the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        z = (x - x.amax(-1, keepdim=True)).mul_(0.5)
        sqrt_p = (z - entmax15_threshold(z)).clamp_min_(0)
        ctx.save_for_backward(sqrt_p)
        return sqrt_p.square()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        sqrt_p, = ctx.saved_tensors
        grad_x = grad * sqrt_p
        shift = grad_x.sum(-1, keepdim=True) / sqrt_p.sum(-1, keepdim=True)
        return grad_x.sub_(shift * sqrt_p)


def entmax15(x: Tensor, dim: int = -1) -> Tensor:
    """entmax-1.5 of ``x`` along ``dim`` (equal to ``entmax.entmax15``).

    Args:
        x (Tensor): logits, any shape.
        dim (int): the dim that sums to 1. Defaults to -1.

    Returns:
        Tensor: like ``x``, non-negative, sparse, summing to 1 along ``dim``.
    """
    if x.shape[dim] == 0:
        raise ValueError(f'entmax15 over an empty dim {dim} of shape '
                         f'{tuple(x.shape)}')
    if dim in (-1, x.dim() - 1):
        return Entmax15.apply(x)
    return Entmax15.apply(x.movedim(dim, -1)).movedim(-1, dim)
