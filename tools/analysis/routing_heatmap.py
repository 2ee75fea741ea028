"""Which experts each class uses: mean routing weight per (class, expert).

Over a data split, for every MoE layer (or those of ``--layers``): the mean
over the class's tokens of the weight with which each expert's output
enters the token (sparse layers: the combine weight of a kept choice, 0
otherwise; Soft MoE / SpheroMoE: the combine weight on the expert's slots).

Writes ``DIR/heatmap_<layer>.png`` per layer (classes and experts reordered
so that the structure shows, unless ``--no-order``) and
``DIR/routing_heatmap.npz``: ``classes``, ``layers``, ``images`` (per
class) and per layer ``<layer>/weights``, ``<layer>/probs`` (the clean
routing distribution), and for sparse layers ``<layer>/taken`` and
``<layer>/dropped`` (share of the class's tokens the expert processed /
dropped), each ``[classes, experts]`` in the original order.

Examples:
    python tools/analysis/routing_heatmap.py \\
        configs/demo/vmoe-demo_2xb64_digits.py work_dirs/vmoe/epoch_30.pth \\
        --out heatmaps
    python tools/analysis/routing_heatmap.py CONFIG CKPT --layers 3 \\
        --split train --out heatmaps
"""
import argparse
import os.path as osp
import sys

import numpy as np
from mmengine.config import DictAction

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import HelpFormatter, add_debug_arg, run_main  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Mean routing weight per (class, expert) and MoE layer',
        formatter_class=HelpFormatter)
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--split', choices=['train', 'val', 'test'], default='val')
    parser.add_argument(
        '--layers',
        nargs='+',
        help='MoE layers: block indices (VisionMoE) or names such as '
        'layers.3.ffn (default: all)')
    parser.add_argument('--batch-size', type=int, help='images per batch')
    parser.add_argument(
        '--no-order',
        action='store_true',
        help='keep classes and experts in index order')
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
    from moe_plugin.analysis.heatmap import class_expert_means
    from moe_plugin.analysis.loading import (build_split_loader,
                                             labelled_batches, load_config,
                                             load_model)
    from moe_plugin.analysis.outputs import prepare_outputs, write_npz
    from moe_plugin.analysis.plots import plot_heatmap
    from moe_plugin.analysis.recording import select_moe_layers

    cfg = load_config(args.config, args.cfg_options)
    model = load_model(cfg, args.checkpoint, args.device)
    layers = select_moe_layers(model, args.layers)
    names = [f'heatmap_{name}.png' for name in layers]
    paths = prepare_outputs(args.out, names + ['routing_heatmap.npz'],
                            args.force)
    loader = build_split_loader(cfg, args.split, args.batch_size)
    classes = list(loader.dataset.metainfo.get('classes') or [])
    num_classes = len(classes) or int(cfg.model.head.num_classes)
    classes = classes or [str(i) for i in range(num_classes)]
    batches = labelled_batches(model, loader, f'{args.split} split')
    means = class_expert_means(model, batches, num_classes, layers)
    arrays = dict(
        classes=np.array(classes),
        layers=np.array(list(means)),
        images=next(iter(means.values()))['images'])
    tag = osp.splitext(osp.basename(args.config))[0]
    for name, result in means.items():
        for key in ('weights', 'probs', 'taken', 'dropped'):
            if key in result:
                arrays[f'{name}/{key}'] = result[key]
        layer = layers[name]
        detail = f"{result['kind'].replace('_', ' ')}, E={layer.num_experts}"
        if result['kind'] == 'token_choice':
            detail += f', K={layer.eval_top_k}'
        plot_heatmap(
            result['weights'], classes, paths[f'heatmap_{name}.png'],
            title=f'{tag}\n{name} ({detail}): mean routing weight, '
            f'{args.split}', order=not args.no_order)
    write_npz(paths['routing_heatmap.npz'], **arrays)
    print(f'written: {", ".join(paths.values())}')
    return means


if __name__ == '__main__':
    run_main(main)
