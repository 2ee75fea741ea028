"""The soft layers' kernels alone: expert matmuls against the GEMM roof, and
the dropout mask draws.

MoE Jetpack's layout (D 192; 98 core experts of hidden width 768 and 196
universal experts of 192, one slot each, so ``batch`` rows per expert) runs
three batched matmuls per expert group and pass: the forward ``x @ w``, the
input gradient ``g @ w^T`` and the weight gradient ``x^T @ g``. Each is
timed alone (median of interleaved rounds) next to the dense MLP's matmul of
the same FLOPs on ``batch * 197`` rows, and reported as GFLOP/s and as a
fraction of this machine's large-GEMM roof (``roofline.py``'s 2048^3
float32 GEMM). With ``batch`` rows per expert the weights are re-read for
every few rows, which is why these rows stay well below the roof on a CPU.

The mask rows time the draws of an expert dropout mask for the core
experts' hidden activations ``[98, batch, 768]``: ``torch.rand`` (one
generator call per value), ``bernoulli_`` and
:func:`moe_plugin.layers.experts.random_words32` (two 32-bit values per
64-bit call, what :class:`~moe_plugin.layers.experts.ExpertDropout` uses).

Usage::

    python benchmarks/soft_kernels.py [--batch 8 32] [--threads 2] \
        [--repeats 9] [--json out.json]
"""
import argparse
import os.path as osp
import platform
import statistics
import sys

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from report import report  # noqa: E402
from roofline import measure_roofs  # noqa: E402
from timing import interleaved_times  # noqa: E402

from moe_plugin.layers.experts import random_words32  # noqa: E402
from moe_plugin.malloc import keep_freed_memory  # noqa: E402

DIMS, TOKENS = 192, 197
GROUPS = (('core', 98, 768), ('universal', 196, 192))


def matmul_cases(batch):
    """``(name, closure, flops)`` for every expert matmul and its dense
    counterpart at ``batch`` rows per expert."""
    rows = batch * TOKENS
    cases = []
    for group, experts, hidden in GROUPS:
        for first, (d_in, d_out) in enumerate(((DIMS, hidden),
                                               (hidden, DIMS))):
            x = torch.randn(experts, batch, d_in)
            w = torch.randn(experts, d_in, d_out)
            g = torch.randn(experts, batch, d_out)
            bias = torch.randn(experts, 1, d_out)
            flops = 2 * experts * batch * d_in * d_out
            layer = f'{group} w{first + 1}'
            cases += [
                (f'{layer} forward', lambda x=x, w=w, b=bias: torch.baddbmm(
                    b, x, w), flops),
                (f'{layer} input grad', lambda g=g, w=w: torch.bmm(
                    g, w.transpose(1, 2)), flops),
                (f'{layer} weight grad', lambda x=x, g=g: torch.bmm(
                    x.transpose(1, 2), g), flops),
            ]
    hidden = GROUPS[0][2]
    a, w = torch.randn(rows, DIMS), torch.randn(DIMS, hidden)
    cases.append((f'dense MLP fc1 ({rows} rows)', lambda: torch.mm(a, w),
                  2 * rows * DIMS * hidden))
    return cases


def mask_cases(batch):
    """``(name, closure)`` drawing one core-expert dropout mask."""
    shape = (GROUPS[0][1], batch, GROUPS[0][2])
    buffer = torch.empty(shape)
    return [('mask: torch.rand', lambda: torch.rand(shape)),
            ('mask: bernoulli_', lambda: buffer.bernoulli_(0.6)),
            ('mask: random_words32', lambda: random_words32(shape))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, nargs='+', default=[8, 32])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=9)
    parser.add_argument('--json', help='write the rows to this JSON file')
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    roofs = measure_roofs(torch.device('cpu'))
    rows = []
    for batch in args.batch:
        cases = matmul_cases(batch)
        masks = mask_cases(batch)
        times = interleaved_times([c[1] for c in cases + masks],
                                  args.repeats)
        for (name, _, flops), record in zip(cases, times):
            ms = statistics.median(record) * 1e3
            gflops = flops / ms / 1e6
            rows.append(dict(batch=batch, kernel=name, ms=round(ms, 3),
                             gflops=round(gflops, 1),
                             of_roof=round(gflops / roofs['gflops'], 2)))
        for (name, _), record in zip(masks, times[len(cases):]):
            rows.append(dict(batch=batch, kernel=name,
                             ms=round(statistics.median(record) * 1e3, 3),
                             gflops='', of_roof=''))
    print(f'torch {torch.__version__}, {args.threads} threads, '
          f'{platform.processor() or platform.machine()}: matmul roof '
          f"{roofs['gflops']} GFLOP/s ({roofs['gemm']}), copy "
          f"{roofs['gbps']} GB/s")
    for row in rows:
        row.update(threads=args.threads, roof_gflops=roofs['gflops'])
    report(rows, ('batch', 'kernel', 'ms', 'gflops', 'of_roof'), 26,
           args.json)


if __name__ == '__main__':
    main()
