"""Total and active parameters, FLOPs per image, dense and MoE parts apart.

FLOPs are 2 x multiply-accumulates of the matrix products (the convention of
``torch.utils.flop_counter``), measured over one forward pass at the
configured routing (K, capacity, group size; ``--mode train`` for the
training values), so an MoE layer's experts count over their whole static
buffer, padding included; fused CPU attention and the sparse combine are
counted analytically (see ``moe_plugin/analysis/flops.py``).

Examples:
    python tools/analysis/get_flops.py configs/demo/vmoe-demo_2xb64_digits.py
    python tools/analysis/get_flops.py CONFIG --shape 224 \\
        --dense-config configs/vit/vit-s32.py --json flops.json
"""
import argparse
import math
import os.path as osp
import sys

import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import HelpFormatter, add_debug_arg, run_main  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Parameters and FLOPs per image of a model',
        formatter_class=HelpFormatter)
    parser.add_argument('config', help='config file path')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        help='input size: one value (square) or H W; defaults to the '
        "backbone's img_size, else 224")
    parser.add_argument(
        '--dense-config', help='a dense twin whose figures go beside')
    parser.add_argument(
        '--mode',
        choices=['eval', 'train'],
        default='eval',
        help='count at the evaluation (default) or training routing')
    parser.add_argument('--json', help='also write the figures to this file')
    parser.add_argument(
        '--force', action='store_true', help='overwrite --json if it exists')
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    if args.shape is not None and (len(args.shape) not in (1, 2)
                                   or min(args.shape) < 1):
        parser.error(f'--shape takes one or two sizes >= 1, got {args.shape}')
    return args


def input_shape(cfg, shape):
    if shape is not None:
        return (shape[0], shape[-1])
    size = cfg.model.get('backbone', {}).get('img_size', 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def measure(config, shape, mode):
    from mmengine.model import BaseModel

    from moe_plugin.analysis.flops import count_flops
    from moe_plugin.analysis.loading import load_config, load_model
    from moe_plugin.analysis.recording import find_moe_layers
    from moe_plugin.layers import SparseMoE
    cfg = load_config(config)
    model = load_model(cfg)
    model.train(mode == 'train')
    size = input_shape(cfg, shape)
    # A whole number of routing groups.
    images = 1
    for layer in find_moe_layers(model).values():
        if isinstance(layer, SparseMoE):
            images = math.lcm(images,
                              layer.routing_options()['group_size'] or 1)
    channels = cfg.model.get('backbone', {}).get('in_channels', 3)
    inputs = torch.randn(images, channels, *size)

    def forward(net, x):
        if isinstance(net, BaseModel):
            return net(x, mode='tensor')
        return net(x)

    figures = count_flops(model, inputs, forward)
    figures.update(config=config, shape=list(size), mode=mode)
    return figures


def fmt(value):
    for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(value) >= scale:
            return f'{value / scale:.3f} {unit}'
    return f'{value:.0f}'


def table(figures):
    rows = [('part', 'params', 'active params', 'FLOPs / image')]
    params, flops = figures['params'], figures['flops']
    rows.append(('dense (non-MoE)', fmt(params['dense']), fmt(params['dense']),
                 fmt(flops['dense'])))
    for layer in figures['layers']:
        if layer['kind'] == 'soft':
            what = (f"soft, E={layer['num_experts']}, "
                    f"p={layer['slots_per_expert']}")
        else:
            what = (f"{layer['kind'].replace('_', ' ')}, "
                    f"E={layer['num_experts']}, K={layer['top_k']}, "
                    f"B={layer['capacity']}, S={layer['group_tokens']}")
        rows.append((f"{layer['name']} ({what})", fmt(layer['params']),
                     fmt(layer['active_params']), fmt(layer['flops'])))
        rows.append(('  router / mixing', '', '', fmt(layer['flops_router'])))
        if layer['kind'] == 'soft':
            rows.append(('  experts', '', '', fmt(layer['flops_experts'])))
        else:
            rows.append(
                (f"  experts ({layer['slots']} slots for "
                 f"{layer['assignments']} assignments)", '', '',
                 fmt(layer['flops_experts'])))
            rows.append((f"    of which padding ({layer['padding_slots']} "
                         'slots)', '', '', fmt(layer['flops_padding'])))
        if layer['flops_combine']:
            rows.append(('  combine (analytic)', '', '',
                         fmt(layer['flops_combine'])))
    rows.append(('MoE total', fmt(params['moe']), fmt(params['moe_active']),
                 fmt(flops['moe'])))
    rows.append(('total', fmt(params['total']), fmt(params['active']),
                 fmt(flops['total'])))
    if flops['attention_analytic']:
        rows.append(('  incl. attention (analytic)', '', '',
                     fmt(flops['attention_analytic'])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        '  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, '-' * len(lines[0]))
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.json and osp.exists(args.json) and not args.force:
        raise FileExistsError(f'{args.json} exists; pass --force to '
                              'overwrite it')
    figures = measure(args.config, args.shape, args.mode)
    shape = 'x'.join(map(str, figures['shape']))
    print(f'{args.config} at {shape} ({args.mode} routing)')
    print(table(figures))
    result = dict(model=figures)
    if args.dense_config:
        dense = measure(args.dense_config, figures['shape'], args.mode)
        print(f'\ndense twin {args.dense_config}')
        print(table(dense))
        ratio = figures['flops']['total'] / dense['flops']['total']
        print(f'\nMoE / dense: {ratio:.3f}x FLOPs per image, '
              f"{figures['params']['total'] / dense['params']['total']:.3f}x "
              'parameters, '
              f"{figures['params']['active'] / dense['params']['active']:.3f}"
              'x active parameters')
        result['dense'] = dense
    if args.json:
        from moe_plugin.analysis.outputs import write_json
        write_json(args.json, result)
    return result


if __name__ == '__main__':
    run_main(main)
