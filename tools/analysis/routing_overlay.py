"""Which patches of one image each expert took, and which were dropped.

The image goes through the config's test pipeline; one PNG per MoE layer
shows the input (with the top-5 classes) and one panel per expert: the
patches it processed (sparse layers; patches that chose it but were dropped
for lack of capacity are outlined in red, and a last panel shows the
patches with a dropped choice) or the share of its slot inputs each patch
gave (Soft MoE / SpheroMoE). ``--capacity``, ``--top-k`` and ``--bpr``
change the test-time routing first (e.g. a low capacity with BPR on shows
which patches BPR drops); each image is its own routing group.

Writes ``DIR/overlay_<layer>.png`` per layer and ``DIR/overlay.json`` (the
top-5 and, per layer and expert, the patch indices taken and dropped, or
the soft dispatch weights).

Examples:
    python tools/analysis/routing_overlay.py \\
        configs/demo/vmoe-demo_2xb64_digits.py work_dirs/vmoe/epoch_30.pth \\
        data/digits/val/3/0003.png --out overlay
    python tools/analysis/routing_overlay.py CONFIG CKPT img.png \\
        --capacity 0.5 --bpr on --out overlay_bpr
"""
import argparse
import os.path as osp
import sys

import numpy as np
from mmengine.config import DictAction

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import (HelpFormatter, add_debug_arg,  # noqa: E402
                            capacity_factor_arg, run_main)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Overlay the routing of one image on it',
        formatter_class=HelpFormatter)
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('image', help='image file')
    parser.add_argument(
        '--layers',
        nargs='+',
        help='MoE layers: block indices (VisionMoE) or names (default: all)')
    parser.add_argument(
        '--capacity',
        type=capacity_factor_arg,
        help='test-time capacity factor')
    parser.add_argument('--top-k', type=int, help='test-time K')
    parser.add_argument(
        '--bpr',
        choices=['on', 'off'],
        help='test-time Batch Priority Routing')
    parser.add_argument(
        '--max-experts',
        type=int,
        default=16,
        help='panels for at most this many experts per layer, those with '
        'the largest share of the image (default 16; the JSON has all)')
    parser.add_argument('--out', required=True, help='output directory')
    parser.add_argument(
        '--force', action='store_true', help='overwrite existing outputs')
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value pairs')
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    if args.max_experts < 1:
        parser.error(f'--max-experts must be >= 1, got {args.max_experts}')
    return args


def shown_experts(routing, max_experts):
    """The experts with the largest share of the image, in index order."""
    share = routing.weights[0].sum(0)
    if share.numel() <= max_experts:
        return list(range(share.numel()))
    return sorted(share.topk(max_experts).indices.tolist())


def panels_of(masks, experts):
    """``(name, weights, outline)`` panels of one layer's masks."""
    panels = []
    if masks['kind'] == 'soft':
        for e in experts:
            panels.append((f'expert {e}', masks['dispatch'][e], None))
        return panels
    dropped = masks.get('dropped')
    for e in experts:
        outline = None if dropped is None else dropped[e]
        count = int(masks['taken'][e].sum())
        name = f'expert {e}\n{count} taken'
        if outline is not None and outline.any():
            name += f', {int(outline.sum())} dropped'
        panels.append((name, masks['taken'][e], outline))
    if dropped is not None:
        any_dropped = dropped.any(0)
        panels.append((f'a choice dropped\n{int(any_dropped.sum())} patches',
                       any_dropped.astype(float), any_dropped))
    return panels


def main(argv=None):
    args = parse_args(argv)
    from moe_plugin.analysis.loading import (class_names, load_config,
                                             load_model)
    from moe_plugin.analysis.outputs import prepare_outputs, write_json
    from moe_plugin.analysis.overlay import (expert_masks, image_routing,
                                             prepare_image, read_image,
                                             token_grid)
    from moe_plugin.analysis.plots import plot_overlays
    from moe_plugin.analysis.recording import select_moe_layers
    from moe_plugin.layers import set_eval_routing

    read_image(args.image)
    cfg = load_config(args.config, args.cfg_options)
    model = load_model(cfg, args.checkpoint, args.device)
    layers = select_moe_layers(model, args.layers)
    paths = prepare_outputs(
        args.out, [f'overlay_{name}.png' for name in layers] +
        ['overlay.json'], args.force)
    # One image is one routing group; then the requested changes.
    set_eval_routing(
        model,
        group_size=None,
        capacity_factor=args.capacity,
        top_k=args.top_k,
        batch_priority=None if args.bpr is None else args.bpr == 'on')
    inputs, picture = prepare_image(model, cfg, args.image)
    probabilities, records = image_routing(
        model, inputs.to(args.device), layers)
    names = class_names(model, probabilities.numel())
    scores, indices = probabilities.topk(min(5, probabilities.numel()))
    top5 = [(names[i], float(p)) for p, i in zip(scores, indices)]
    ranking = ', '.join(f'{n} {100 * p:.1f}%' for n, p in top5)
    report = dict(image=args.image, top5=top5, layers={})
    for name, routing in records.items():
        (rows, cols), extra = token_grid(model, routing.weights.shape[1])
        masks = expert_masks(routing, extra)
        num_experts = routing.weights.shape[-1]
        experts = shown_experts(routing, args.max_experts)
        layer = layers[name]
        detail = routing.kind.replace('_', ' ')
        if routing.kind == 'token_choice':
            detail += (f', K={layer.eval_top_k}, '
                       f'c={layer.eval_capacity_factor:g}, BPR '
                       f"{'on' if layer.eval_batch_priority else 'off'}")
        if len(experts) < num_experts:
            detail += (f'; the {len(experts)} of {num_experts} experts '
                       'with most of the image')
        plot_overlays(
            picture, (rows, cols), panels_of(masks, experts),
            paths[f'overlay_{name}.png'],
            title=f'{osp.basename(args.image)}: {name} ({detail})\n'
            f'top-5: {ranking}')
        entry = dict(kind=routing.kind, grid=[rows, cols],
                     extra_tokens=extra)
        if routing.kind == 'soft':
            entry['dispatch'] = np.round(masks['dispatch'], 6).tolist()
        else:
            entry['taken'] = [np.flatnonzero(m).tolist()
                              for m in masks['taken']]
            if 'dropped' in masks:
                entry['dropped'] = [np.flatnonzero(m).tolist()
                                    for m in masks['dropped']]
            if extra:
                entry['extra_taken'] = [np.flatnonzero(m).tolist()
                                        for m in masks['extra_taken']]
        report['layers'][name] = entry
    write_json(paths['overlay.json'], report)
    print(f'top-5: {ranking}')
    print(f'written: {", ".join(paths.values())}')
    return report


if __name__ == '__main__':
    run_main(main)
