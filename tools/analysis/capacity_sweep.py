"""Top-1 against the share of tokens processed, at test-time capacities.

Loads a trained model once and evaluates it on a data split at every
(K, BPR, capacity factor) setting, changed in place with
``set_eval_routing`` (no retraining): V-MoE's adaptive-inference plot,
vanilla routing against Batch Priority Routing.

Writes ``DIR/capacity_sweep.json``, ``DIR/capacity_sweep.csv`` (one row per
setting: capacity factor, K, BPR, top-1, fraction of (token, choice) pairs
processed, and that fraction per MoE layer) and ``DIR/capacity_sweep.png``.

Examples:
    python tools/analysis/capacity_sweep.py \\
        configs/demo/vmoe-demo_2xb64_digits.py work_dirs/vmoe/epoch_30.pth \\
        --capacity 0.1 0.25 0.5 1 2 4 --top-k 1 2 --bpr both --out sweep
"""
import argparse
import itertools
import os.path as osp
import sys

from mmengine.config import DictAction

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import (HelpFormatter, add_debug_arg,  # noqa: E402
                            capacity_factor_arg, run_main)

BPR_CHOICES = {'off': (False, ), 'on': (True, ), 'both': (False, True)}
NAMES = ('capacity_sweep.json', 'capacity_sweep.csv', 'capacity_sweep.png')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Evaluate a checkpoint at test-time capacity factors',
        formatter_class=HelpFormatter)
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--capacity',
        type=capacity_factor_arg,
        nargs='+',
        default=[0.1, 0.25, 0.5, 1.0, 2.0, 4.0],
        help='capacity factors (> 0)')
    parser.add_argument(
        '--top-k', type=int, nargs='+', help="K values (default: the "
        "model's evaluation K)")
    parser.add_argument(
        '--bpr',
        choices=sorted(BPR_CHOICES),
        default='both',
        help='Batch Priority Routing off, on, or both (default)')
    parser.add_argument(
        '--split', choices=['train', 'val', 'test'], default='val')
    parser.add_argument('--batch-size', type=int, help='images per batch')
    parser.add_argument('--out', required=True, help='output directory')
    parser.add_argument(
        '--force', action='store_true', help='overwrite existing outputs')
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value pairs')
    add_debug_arg(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from moe_plugin.analysis.loading import (build_split_loader,
                                             labelled_batches, load_config,
                                             load_model)
    from moe_plugin.analysis.outputs import (prepare_outputs, write_csv,
                                             write_json)
    from moe_plugin.analysis.plots import plot_capacity_sweep
    from moe_plugin.analysis.sweep import capacity_sweep, check_sweep

    paths = prepare_outputs(args.out, NAMES, args.force)
    cfg = load_config(args.config, args.cfg_options)
    model = load_model(cfg, args.checkpoint, args.device)
    top_ks = args.top_k or [None]
    check_sweep(model, args.capacity, top_ks)
    loader = build_split_loader(cfg, args.split, args.batch_size)
    settings = len(args.capacity) * len(top_ks) * len(BPR_CHOICES[args.bpr])
    done = itertools.count(1)

    def batches():
        return labelled_batches(
            model, loader, f'setting {next(done)}/{settings} ({args.split})')

    rows = capacity_sweep(model, batches, args.capacity, top_ks,
                          BPR_CHOICES[args.bpr])
    layers = list(rows[0]['layers'])
    for row in rows:
        for name in layers:
            row[f'processed/{name}'] = row['layers'][name]
    columns = ['capacity_factor', 'top_k', 'batch_priority', 'top1',
               'processed_fraction', 'images'
               ] + [f'processed/{name}' for name in layers]
    write_json(paths['capacity_sweep.json'],
               dict(config=args.config, checkpoint=args.checkpoint,
                    split=args.split, rows=rows))
    write_csv(paths['capacity_sweep.csv'], rows, columns)
    plot_capacity_sweep(
        rows, paths['capacity_sweep.png'],
        title=f'{osp.splitext(osp.basename(args.config))[0]}: capacity '
        f'sweep ({args.split}, {rows[0]["images"]} images)')
    print(f"{'c':>6} {'K':>2} {'BPR':>4} {'top-1':>7} {'processed':>9}")
    for row in rows:
        print(f"{row['capacity_factor']:>6g} {row['top_k']:>2} "
              f"{'on' if row['batch_priority'] else 'off':>4} "
              f"{row['top1']:>7.2f} {100 * row['processed_fraction']:>8.2f}%")
    print(f'written: {", ".join(paths.values())}')
    return rows


if __name__ == '__main__':
    run_main(main)
