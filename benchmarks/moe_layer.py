"""Time the sparse MoE layer against the dense MLP doing the same work.

For top-K routing the dense equivalent is the MLP applied to ``K * N``
tokens (the useful work of the experts). ``ratio = moe_ms / dense_ms`` for a
forward + backward pass, median of ``--repeats`` runs after a warm-up, all
inside one run (machines are noisy). The experts run over the whole static
buffer of ``E * G * B`` rows, ``B = ceil(S * K * c / E)`` rounded up to a
multiple of 4 (864 rows for 800 useful ones at N = 400), so the table also
gives ``ratio_same_flop``: the MoE against the MLP on as many rows as the
buffer, i.e. the cost of routing, dispatch and combine alone.

Rows: the static index dispatch (vanilla and BPR) and the one-hot einsum
reference (the V-MoE way) at N = 400 (8 images of ViT-S/32, one group) and
N = 3200 (64 images, 8 groups of 400), E = 8, K = 2, c = 1.05, D = 384,
H = 1536.

Soft rows (``--soft``): Soft MoE (E = 8 with 6 slots; E = 50 with 1 slot)
and SpheroMoE (25 core + 50 universal experts) on ViT-S/32 tokens
(50 per image, D = 384, H = 1536) at batch 8 and 64, against the dense MLP
on as many rows as the slots the experts process (universal slots counted
at their quarter width), and MoE Jetpack's layer layout (D = 192, 197
tokens, 98 core + 196 universal experts of 1 slot, slot LayerNorm,
entmax-1.5, noise, expert dropout 0.4) at batch 8 and 32 against the dense
MLP ``192 -> 768 -> 192`` on the same tokens (spec 05: goal <= 1.6x at
batch 32; FLOPs 1.32x).

Every row also gives each step's matmul FLOPs and least memory traffic
(``moe_gflop``, ``moe_mb``, ``dense_gflop``, ``dense_mb``; see
``benchmarks/cost.py``), from which ``benchmarks/roofline.py`` computes the
floors.

Usage::

    python benchmarks/moe_layer.py [--threads 2] [--repeats 7] [--soft] \
        [--device cuda] [--amp] [--json out.json]
"""
import argparse
import contextlib
import os
import platform
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cost import step_cost  # noqa: E402
from report import report  # noqa: E402
from timing import interleaved_times  # noqa: E402

from moe_plugin.layers import (SoftMoE, SparseMoE, SpheroMoE,  # noqa: E402
                               compute_capacity, einsum_top_k_combine,
                               einsum_top_k_forward)
from moe_plugin.malloc import keep_freed_memory  # noqa: E402

DIM, HIDDEN, EXPERTS, TOP_K, FACTOR = 384, 1536, 8, 2, 1.05
TOKENS_PER_IMAGE = 50  # ViT-S/32 at 224 px: 49 patches + class token
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


def dense_mlp(dims=DIM, hidden=HIDDEN, approximate='tanh'):
    return nn.Sequential(
        nn.Linear(dims, hidden), nn.GELU(approximate=approximate),
        nn.Linear(hidden, dims))


def fwd_bwd_step(module, x, amp=False):
    """A closure running one forward + backward pass (bfloat16 autocast
    with ``amp``; synchronised on CUDA so that it can be timed)."""
    grad = torch.randn_like(x)
    cuda = x.device.type == 'cuda'

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        with (torch.autocast(x.device.type, dtype=torch.bfloat16)
              if amp else contextlib.nullcontext()):
            out = module(x)
        out.backward(grad.to(out.dtype))
        if cuda:
            torch.cuda.synchronize()

    return step


def costs(prefix, step, module):
    """``{prefix}_gflop`` and ``{prefix}_mb`` of one step, rounded."""
    cost = step_cost(step, module)
    return {f'{prefix}_{k}': round(v, 3) for k, v in cost.items()}


def time_round_robin(steps, repeats, warmup=3):
    """Median milliseconds of each step and of each step's ratio to the
    first, timing the steps in turn in every round so that they share the
    machine's noise."""
    times = [[t * 1e3 for t in record]
             for record in interleaved_times(steps, repeats, warmup)]
    medians = [statistics.median(record) for record in times]
    ratios = [
        statistics.median(t / d for t, d in zip(record, times[0]))
        for record in times
    ]
    return medians, ratios


def run(threads, repeats, device, amp=False):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    variants = (('index', False, False), ('index+bpr', True, False),
                ('einsum', False, True), ('einsum+bpr', True, True))
    for tokens in (400, 3200):
        images = tokens // TOKENS_PER_IMAGE
        # The experts run over the whole static buffer of E * G * B rows.
        buffer_rows = EXPERTS * (images // GROUP_IMAGES) * compute_capacity(
            GROUP_IMAGES * TOKENS_PER_IMAGE, EXPERTS, TOP_K, FACTOR)
        steps, modules = [], []
        for rows_in in (TOP_K * tokens, buffer_rows):
            dense_x = torch.randn(
                rows_in, DIM, device=device, requires_grad=True)
            modules.append(dense_mlp().to(device))
            steps.append(fwd_bwd_step(modules[-1], dense_x, amp))
        x = torch.randn(
            images, TOKENS_PER_IMAGE, DIM, device=device, requires_grad=True)
        for _, bpr, einsum in variants:
            layer = SparseMoE(
                DIM,
                HIDDEN,
                num_experts=EXPERTS,
                top_k=TOP_K,
                capacity_factor=FACTOR,
                batch_priority=bpr,
                group_size=GROUP_IMAGES).to(device).train()
            modules.append(EinsumMoE(layer) if einsum else layer)
            steps.append(fwd_bwd_step(modules[-1], x, amp))
        medians, ratios = time_round_robin(steps, repeats)
        dense_ms, buffer_ms = medians[:2]
        dense_cost = costs('dense', steps[0], modules[0])
        for (name, _, _), moe_ms, ratio, step, module in zip(
                variants, medians[2:], ratios[2:], steps[2:], modules[2:]):
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
                    ratio=round(ratio, 3),
                    buffer_rows=buffer_rows,
                    same_flop_ms=round(buffer_ms, 3),
                    ratio_same_flop=round(ratio / ratios[1], 3),
                    threads=threads,
                    device=device,
                    amp=amp,
                    repeats=repeats,
                    **costs('moe', step, module),
                    **dense_cost))
    return rows


def soft_rows(threads, repeats, device, amp=False):
    """Soft MoE and SpheroMoE against the dense MLP of the same work."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    vits32 = [
        ('softmoe-8e-6slots', dict(type=SoftMoE, num_experts=8,
                                   slots_per_expert=6), 48),
        ('softmoe-50e-1slot', dict(type=SoftMoE, num_experts=50,
                                   slots_per_expert=1), 50),
        ('spheromoe-25+50', dict(type=SpheroMoE, num_experts=25,
                                 num_universal_experts=50), 25 + 50 / 4),
    ]
    cases = [(name, cfg, DIM, HIDDEN, TOKENS_PER_IMAGE, batch, rows_per_image,
              'slots') for batch in (8, 64)
             for name, cfg, rows_per_image in vits32]
    moejet = dict(type=SpheroMoE, num_experts=98, num_universal_experts=196,
                  combine='entmax15', expert_drop=0.4)
    cases += [('moejet-98+196', moejet, 192, 768, 197, batch, 197, 'tokens')
              for batch in (8, 32)]
    for name, cfg, dims, hidden, tokens, batch, dense_rows, ref in cases:
        cfg = dict(cfg)
        layer_cls = cfg.pop('type')
        layer = layer_cls(dims, hidden, **cfg).to(device).train()
        x = torch.randn(batch, tokens, dims, device=device,
                        requires_grad=True)
        rows_in = int(round(batch * dense_rows))
        dense_x = torch.randn(rows_in, dims, device=device,
                              requires_grad=True)
        approximate = 'none' if layer_cls is SpheroMoE else 'tanh'
        dense = dense_mlp(dims, hidden, approximate).to(device)
        steps = [
            fwd_bwd_step(dense, dense_x, amp),
            fwd_bwd_step(layer, x, amp)
        ]
        medians, ratios = time_round_robin(steps, repeats)
        rows.append(
            dict(
                layer=name,
                tokens=batch * tokens,
                batch=batch,
                dims=dims,
                hidden=hidden,
                dense_reference=f'MLP on {rows_in} rows ({ref})',
                moe_ms=round(medians[1], 3),
                dense_equivalent_ms=round(medians[0], 3),
                ratio=round(ratios[1], 3),
                threads=threads,
                device=device,
                amp=amp,
                repeats=repeats,
                **costs('moe', steps[1], layer),
                **costs('dense', steps[0], dense)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', action='store_true',
                        help='bfloat16 autocast')
    parser.add_argument(
        '--soft',
        action='store_true',
        help='time Soft MoE and SpheroMoE instead of the sparse layer')
    parser.add_argument('--json', help='write the rows to this JSON file')
    args = parser.parse_args()
    # Large blocks from the heap, reused step to step (moe_plugin/malloc.py).
    keep_freed_memory()
    if args.repeats < 5:
        parser.error('--repeats must be >= 5')
    if args.soft:
        rows = soft_rows(args.threads, args.repeats, args.device, args.amp)
        header = ('layer', 'batch', 'tokens', 'moe_ms',
                  'dense_equivalent_ms', 'ratio', 'dense_reference')
    else:
        rows = run(args.threads, args.repeats, args.device, args.amp)
        header = ('layer', 'tokens', 'moe_ms', 'dense_equivalent_ms',
                  'ratio', 'same_flop_ms', 'ratio_same_flop')
    print(f'torch {torch.__version__}, {args.threads} threads, '
          f'{platform.processor() or platform.machine()}, {args.device}, '
          f'amp={args.amp}')
    report(rows, header, 19, args.json)


if __name__ == '__main__':
    main()
