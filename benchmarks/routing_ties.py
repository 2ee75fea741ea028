"""Cost of jax-like tie-breaking in the routers (``stable_topk``).

A/B in one process: the same sparse MoE layers (forward + backward, the
shapes of ``benchmarks/moe_layer.py``: E = 8, K = 2, c = 1.05, D = 384,
H = 1536, groups of 400 tokens) with the routers' ``stable_topk`` and with
plain ``torch.topk`` (whose order among ties is unspecified), timed in turn
in every round so that both share the machine's noise; also token choice
with BPR and expert choice. ``ratio = stable_ms / topk_ms``, the median of
the per-round ratios.

Usage::

    python benchmarks/routing_ties.py [--threads 1] [--repeats 9] \
        [--json out.json]
"""
import argparse
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from moe_layer import fwd_bwd_step, time_round_robin  # noqa: E402
from report import report  # noqa: E402

from moe_plugin.layers import SparseMoE  # noqa: E402
from moe_plugin.layers import routing  # noqa: E402

DIM, HIDDEN, EXPERTS, TOP_K, FACTOR = 384, 1536, 8, 2, 1.05
TOKENS_PER_IMAGE, GROUP_IMAGES = 50, 8


def plain_topk(x, k, dim=-1):
    return x.topk(k, dim=dim)


def with_topk(step, topk):
    """``step`` run with the routers' top-k function set to ``topk``."""

    def run():
        saved = routing.stable_topk
        routing.stable_topk = topk
        try:
            step()
        finally:
            routing.stable_topk = saved

    return run


def run(threads, repeats, device):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    for tokens in (400, 3200):
        images = tokens // TOKENS_PER_IMAGE
        x = torch.randn(
            images, TOKENS_PER_IMAGE, DIM, device=device, requires_grad=True)
        for name, kwargs in (('top2', {}), ('top2+bpr',
                                            dict(batch_priority=True)),
                             ('expert-choice',
                              dict(router='expert_choice'))):
            layer = SparseMoE(
                DIM,
                HIDDEN,
                num_experts=EXPERTS,
                top_k=TOP_K,
                capacity_factor=FACTOR,
                group_size=GROUP_IMAGES,
                **kwargs).to(device).train()
            step = fwd_bwd_step(layer, x)
            steps = [
                with_topk(step, plain_topk),
                with_topk(step, routing.stable_topk)
            ]
            medians, ratios = time_round_robin(steps, repeats)
            rows.append(
                dict(
                    layer=name,
                    tokens=tokens,
                    topk_ms=round(medians[0], 3),
                    stable_ms=round(medians[1], 3),
                    ratio=round(ratios[1], 3),
                    threads=threads,
                    device=device,
                    repeats=repeats))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=9)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json', help='write the rows to this JSON file')
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error('--repeats must be >= 5')
    rows = run(args.threads, args.repeats, args.device)
    header = ('layer', 'tokens', 'topk_ms', 'stable_ms', 'ratio')
    print(f'torch {torch.__version__}, {args.threads} threads, '
          f'{platform.processor() or platform.machine()}, {args.device}')
    report(rows, header, 13, args.json)


if __name__ == '__main__':
    main()
