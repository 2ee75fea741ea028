"""Time the sparse MoE layer against the dense MLP doing the same work.

For top-K routing the dense equivalent is the MLP applied to ``K * N``
tokens (the useful work of the experts). ``ratio = moe_ms / dense_ms`` for a
forward + backward pass, median of ``--repeats`` runs after a warm-up, all
inside one run (machines are noisy).

Rows: the static index dispatch (vanilla and BPR) and the one-hot einsum
reference (the V-MoE way) at N = 400 (8 images of ViT-S/32, one group) and
N = 3200 (64 images, 8 groups of 400), E = 8, K = 2, c = 1.05, D = 384,
H = 1536.

Usage::

    python benchmarks/moe_layer.py [--threads 2] [--repeats 7] [--json out.json]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_plugin.layers import (SparseMoE, compute_capacity,  # noqa: E402
                               einsum_top_k_combine, einsum_top_k_forward)

DIM, HIDDEN, EXPERTS, TOP_K, FACTOR, TOKENS_PER_IMAGE = 384, 1536, 8, 2, 1.05, 50
GROUP_IMAGES = 8


class EinsumMoE(nn.Module):
    """The same layer routed through the one-hot einsum reference."""

    def __init__(self, layer: SparseMoE):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        groups = layer.group(x, layer.group_size)
        logits = nn.functional.linear(groups, layer.router.weight)
        noisy = logits + torch.randn_like(logits) / layer.num_experts
        capacity = compute_capacity(groups.shape[1], layer.num_experts,
                                    layer.top_k, layer.capacity_factor)
        combine = einsum_top_k_combine(noisy.softmax(-1), layer.top_k,
                                       capacity, layer.batch_priority)
        return einsum_top_k_forward(groups, combine,
                                    layer.experts).view_as(x)


def dense_mlp():
    return nn.Sequential(
        nn.Linear(DIM, HIDDEN), nn.GELU(approximate='tanh'),
        nn.Linear(HIDDEN, DIM))


def time_fwd_bwd(module, x, repeats, warmup=3):
    """Median milliseconds of forward + backward."""
    grad = torch.randn_like(x)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(threads, repeats, device):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    for tokens in (400, 3200):
        images = tokens // TOKENS_PER_IMAGE
        dense_x = torch.randn(
            TOP_K * tokens, DIM, device=device, requires_grad=True)
        dense_ms = time_fwd_bwd(dense_mlp().to(device), dense_x, repeats)
        x = torch.randn(
            images, TOKENS_PER_IMAGE, DIM, device=device, requires_grad=True)
        for name, bpr, einsum in (('index', False, False),
                                  ('index+bpr', True, False),
                                  ('einsum', False, True),
                                  ('einsum+bpr', True, True)):
            layer = SparseMoE(
                DIM,
                HIDDEN,
                num_experts=EXPERTS,
                top_k=TOP_K,
                capacity_factor=FACTOR,
                batch_priority=bpr,
                group_size=GROUP_IMAGES).to(device).train()
            module = EinsumMoE(layer) if einsum else layer
            moe_ms = time_fwd_bwd(module, x, repeats)
            rows.append(
                dict(
                    layer=f'top{TOP_K}-{name}',
                    tokens=tokens,
                    experts=EXPERTS,
                    capacity_factor=FACTOR,
                    dims=DIM,
                    hidden=HIDDEN,
                    moe_ms=round(moe_ms, 3),
                    dense_equivalent_ms=round(dense_ms, 3),
                    ratio=round(moe_ms / dense_ms, 3),
                    threads=threads,
                    device=device,
                    repeats=repeats))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json', help='write the rows to this JSON file')
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error('--repeats must be >= 5')
    rows = run(args.threads, args.repeats, args.device)
    header = ('layer', 'tokens', 'moe_ms', 'dense_equivalent_ms', 'ratio')
    print(f'torch {torch.__version__}, {args.threads} threads, '
          f'{platform.processor() or platform.machine()}, {args.device}')
    print(' | '.join(f'{h:>20}' for h in header))
    for row in rows:
        print(' | '.join(f'{row[h]!s:>20}' for h in header))
    if args.json:
        tmp = args.json + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(rows, f, indent=2)
        os.replace(tmp, args.json)


if __name__ == '__main__':
    main()
