"""Convert a V-MoE checkpoint (google-research/vmoe) for MMPretrain.

Reads ``PREFIX.index`` and its shards ``PREFIX.data-nnnnn-of-NNNNN`` with
msgpack and numpy only, infers the architecture from the shapes (sparse MoE
or Soft MoE blocks, ``token`` / ``gap`` / ``map`` head, ``pre_logits``),
checks that the model of the written config loads the weights strictly,
and writes ``OUT.pth`` (``{'state_dict': ...}``) and, with ``--config-out``,
a complete config (the model plus ImageNet evaluation).

Examples:
    gsutil -m cp 'gs://vmoe_checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_medium*' ckpt/
    python tools/model_converters/vmoe_to_mmpretrain.py \\
        ckpt/vmoe_s32_last2_ilsvrc2012_randaug_medium \\
        weights/vmoe-s32.pth --config-out configs/vmoe/converted-s32.py
    tools/dist_test.sh configs/vmoe/converted-s32.py weights/vmoe-s32.pth 8
"""  # noqa: E501
import argparse
import os.path as osp
import sys

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import (PER_IMAGE, HelpFormatter,  # noqa: E402
                            add_debug_arg, capacity_factor_arg, group_size_arg,
                            on_off_arg, run_main)
from moe_plugin.converters.vmoe import VMOE_ROUTING_DEFAULTS  # noqa: E402


def parse_args(argv=None):
    d = VMOE_ROUTING_DEFAULTS
    parser = argparse.ArgumentParser(
        description='Convert a V-MoE checkpoint for MMPretrain',
        formatter_class=HelpFormatter)
    parser.add_argument('prefix', help='checkpoint prefix (PREFIX.index)')
    parser.add_argument('out', help='output weights (.pth)')
    parser.add_argument('--config-out', help='write the model config here')
    parser.add_argument(
        '--force', action='store_true', help='overwrite existing outputs')
    routing = parser.add_argument_group(
        'routing (not stored in the checkpoint; V-MoE defaults)')
    routing.add_argument('--top-k', type=int, default=d['top_k'])
    routing.add_argument(
        '--capacity-factor',
        type=capacity_factor_arg,
        default=d['capacity_factor'])
    routing.add_argument(
        '--eval-capacity-factor',
        type=capacity_factor_arg,
        default=d['eval_capacity_factor'])
    routing.add_argument(
        '--batch-priority', type=on_off_arg, default=d['batch_priority'],
        metavar='{on,off}',
        help='Batch Priority Routing in training (default: '
        f"{'on' if d['batch_priority'] else 'off'})")
    routing.add_argument(
        '--eval-batch-priority', type=on_off_arg, metavar='{on,off}',
        help='default: as --batch-priority')
    routing.add_argument(
        '--group-size', type=group_size_arg, default=d['group_size'],
        metavar='{N,image}', help='images per routing group in training')
    routing.add_argument(
        '--eval-group-size', type=group_size_arg, default=d['eval_group_size'],
        metavar='{N,image}',
        help='images per routing group in evaluation (default: image, '
        'batch independent; V-MoE itself routes groups of 8 images)')
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    for name in ('group_size', 'eval_group_size'):
        if getattr(args, name) == PER_IMAGE:
            setattr(args, name, None)
    return args


HEADER = """\
# Converted from the V-MoE checkpoint {prefix}
# by tools/model_converters/vmoe_to_mmpretrain.py; weights: {out}
#   tools/dist_test.sh THIS_CONFIG {out} 8
# Architecture read from the checkpoint: {arch}.
# Routing settings are not stored in V-MoE checkpoints; written here with
# V-MoE's defaults unless given on the command line: {routing}.
# V-MoE evaluates with groups of 8 images (eval_group_size=8, batches per
# GPU must then be multiples of 8); None (one image per group) makes
# predictions independent of the batch. Change them with
# `tools/test.py --eval-top-k / --eval-capacity-factor / --eval-group-size /
# --eval-batch-priority` or `moe_plugin.layers.set_eval_routing`.
"""


def main(argv=None):
    args = parse_args(argv)
    from moe_plugin.converters.output import (arch_text, build_checked_model,
                                              check_outputs, config_header,
                                              config_text, imagenet_meta,
                                              save_converted)
    from moe_plugin.converters.vmoe import convert_vmoe, vmoe_test_pipeline
    check_outputs([args.out, args.config_out], args.force)
    routing = dict(
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        eval_capacity_factor=args.eval_capacity_factor,
        batch_priority=args.batch_priority,
        group_size=args.group_size,
        eval_group_size=args.eval_group_size)
    if args.eval_batch_priority is not None:
        routing['eval_batch_priority'] = args.eval_batch_priority
    state, model_cfg, arch = convert_vmoe(args.prefix, **routing)
    build_checked_model(model_cfg, state)
    config = None
    if args.config_out:
        shown = ('none (Soft MoE)' if arch.moe_type == 'soft' else
                 ', '.join(f'{k}={v}' for k, v in routing.items()))
        header = config_header(
            HEADER,
            prefix=args.prefix,
            out=args.out,
            arch=arch_text(arch),
            routing=shown)
        config = config_text(model_cfg, arch.img_size, header,
                             vmoe_test_pipeline(arch.img_size))
    save_converted(state, args.out, config, args.config_out, args.force,
                   imagenet_meta(arch.num_classes))
    print(f'wrote {args.out}' +
          (f' and {args.config_out}' if args.config_out else '') +
          f': {arch.num_layers} blocks, MoE blocks {list(arch.moe_layers)} '
          f'({arch.moe_type}), {arch.classifier} head, '
          f'{arch.num_classes} classes, {len(state)} tensors')


if __name__ == '__main__':
    run_main(main)
