"""Every layer and model benchmark row against its floor on this machine.

The machine's roofs are measured in the same run: matmul throughput (the
median of a large square GEMM, float32 or, with ``--amp``, bfloat16) and
memory bandwidth (the median of a large tensor copy, bytes read + written).
A step cannot take less than its floor,

    floor = max(matmul FLOPs / throughput, bytes that must move / bandwidth)

with FLOPs and bytes from ``benchmarks/cost.py`` (FLOPs counted by torch's
``FlopCounterMode``, forward and backward; bytes: weights read twice,
gradients written once, saved activations written and read, AdamW's seven
weight-sized passes with an optimizer step). ``moe_floor`` / ``dense_floor``
are the ratios time / floor of the MoE step and of its dense reference
(spec 05's goal for the layers: <= 1.3).

Rows: ``benchmarks/moe_layer.py`` (sparse top-2, with ``--soft`` the soft
layers too) and ``benchmarks/models.py`` (``--models PRESET ...``).

Usage::

    python benchmarks/roofline.py [--sparse] [--soft] \
        [--models vmoe-tiny vjetmoe-t] [--threads 2] [--repeats 7] \
        [--device cuda] [--amp] [--optimizer fused|default] [--json out.json]
"""
import argparse
import os.path as osp
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import models as model_bench  # noqa: E402
import moe_layer as layer_bench  # noqa: E402
from report import report  # noqa: E402

from moe_plugin.malloc import keep_freed_memory  # noqa: E402


def _median_seconds(fn, repeats, device):
    fn()
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_roofs(device, amp=False, repeats=5):
    """Matmul GFLOP/s and copy GB/s of this device (medians).

    Returns:
        dict: ``gflops``, ``gbps`` and the sizes used.
    """
    cuda = device.type == 'cuda'
    size = 8192 if cuda else 2048
    dtype = torch.bfloat16 if amp else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty_like(a)
    gemm_s = _median_seconds(lambda: torch.mm(a, b, out=out), repeats, device)
    numel = (2**28 if cuda else 2**26)  # 1 GiB / 256 MiB of float32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), repeats, device)
    return dict(gflops=round(2 * size**3 / gemm_s / 1e9, 1),
                gbps=round(2 * src.nbytes / copy_s / 1e9, 2),
                gemm=f'{size}x{size}x{size} {dtype}'.replace('torch.', ''),
                copy_mb=round(src.nbytes / 1e6))


def floor_ms(gflop, mb, roofs):
    """``max(compute time, memory time)`` in milliseconds."""
    return max(gflop / roofs['gflops'], mb / 1e3 / roofs['gbps']) * 1e3


def add_floors(row, roofs, moe_ms_key='moe_ms',
               dense_ms_key='dense_equivalent_ms'):
    """Add ``*_floor_ms``, the ratios to the floors and which roof binds."""
    for side, ms_key in (('moe', moe_ms_key), ('dense', dense_ms_key)):
        gflop, mb = row[f'{side}_gflop'], row[f'{side}_mb']
        floor = floor_ms(gflop, mb, roofs)
        row[f'{side}_floor_ms'] = round(floor, 3)
        row[f'{side}_floor'] = round(row[ms_key] / floor, 2)
        row[f'{side}_bound'] = ('compute' if gflop / roofs['gflops'] >=
                                mb / 1e3 / roofs['gbps'] else 'memory')
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sparse', action='store_true',
                        help='the sparse top-2 layer rows')
    parser.add_argument('--soft', action='store_true',
                        help='the Soft MoE and SpheroMoE rows')
    parser.add_argument('--models', nargs='*', default=[],
                        choices=sorted(model_bench.PRESETS),
                        help='whole-model presets (benchmarks/models.py)')
    parser.add_argument('--batch', type=int,
                        help="images per model step (default: the preset's)")
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', action='store_true',
                        help='bfloat16 autocast (and a bfloat16 GEMM roof)')
    parser.add_argument('--optimizer', default='fused',
                        choices=sorted(model_bench.OPTIMIZERS))
    parser.add_argument('--json', help='write roofs and rows to this file')
    args = parser.parse_args()
    # Large blocks from the heap, reused step to step (moe_plugin/malloc.py).
    heap_kept = keep_freed_memory()
    if args.repeats < 5:
        parser.error('--repeats must be >= 5')
    if not (args.sparse or args.soft or args.models):
        parser.error('nothing to do: give --sparse, --soft or --models')
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    roofs = measure_roofs(device, args.amp)
    rows = []
    if args.sparse:
        rows += [
            dict(add_floors(row, roofs), bench='layer', name=(
                f"{row['layer']} N={row['tokens']}"))
            for row in layer_bench.run(args.threads, args.repeats,
                                       args.device, args.amp)
        ]
    if args.soft:
        rows += [
            dict(add_floors(row, roofs), bench='layer', name=(
                f"{row['layer']} B={row['batch']}"))
            for row in layer_bench.soft_rows(args.threads, args.repeats,
                                             args.device, args.amp)
        ]
    for preset in args.models:
        batch = args.batch or model_bench.PRESETS[preset][
            2 if device.type == 'cpu' else 3]
        row = model_bench.run_preset(preset, batch, device, args.amp, False,
                                     args.repeats, optimizer=args.optimizer)
        rows.append(
            dict(add_floors(row, roofs, dense_ms_key='dense_ms'),
                 bench='model', name=f'{preset} B={batch}'))
    machine = dict(
        roofs,
        device=(torch.cuda.get_device_name(device) if device.type == 'cuda'
                else platform.processor() or platform.machine()),
        threads=args.threads, torch=torch.__version__, amp=args.amp,
        keep_freed_memory=heap_kept)
    print(f"torch {torch.__version__}, {args.threads} threads, "
          f"{machine['device']}: matmul {roofs['gflops']} GFLOP/s "
          f"({roofs['gemm']}), copy {roofs['gbps']} GB/s")
    header = ('name', 'moe_ms', 'moe_floor_ms', 'moe_floor', 'moe_bound',
              'dense_floor', 'ratio')
    for row in rows:
        row.setdefault('ratio', row.get('time_ratio'))
        row['dense_ms'] = row.get('dense_ms', row.get('dense_equivalent_ms'))
    report(rows, header, 14, args.json, data=dict(machine=machine,
                                                  rows=rows))


if __name__ == '__main__':
    main()
