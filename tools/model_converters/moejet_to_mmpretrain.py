"""Convert a MoE Jetpack checkpoint (github.com/Adlith/MoE-Jetpack) for
MMPretrain.

Reads its timm-style state dict (bare, ``model.``-prefixed, or under
``state_dict`` as its MMPretrain ``TimmClassifier`` saves it), maps the
dual-path SpheroMoE blocks onto ours, infers the architecture from the
shapes, checks that the model of the written config loads the weights
strictly, and writes ``OUT.pth`` (``{'state_dict': ...}``) and, with
``--config-out``, a complete config (the model plus ImageNet evaluation).

Examples:
    python tools/model_converters/moejet_to_mmpretrain.py \\
        moejet_vit_tiny_in1k.pth weights/vjetmoe-t_in1k.pth \\
        --config-out configs/moejet/converted-vjetmoe-t.py
    tools/dist_test.sh configs/moejet/converted-vjetmoe-t.py \\
        weights/vjetmoe-t_in1k.pth 4
"""
import argparse
import os.path as osp
import sys

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import HelpFormatter, add_debug_arg, run_main  # noqa: E402

HEADER = """\
# Converted from the MoE Jetpack checkpoint {src}
# by tools/model_converters/moejet_to_mmpretrain.py; weights: {out}
#   tools/dist_test.sh THIS_CONFIG {out} 4
# Architecture read from the checkpoint: {arch}.
# Attention heads are not stored in the checkpoint: {heads}.
# MoE Jetpack adds routing noise even in evaluation, so its own published
# numbers carry noise; this model evaluates without it (deterministic).
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert a MoE Jetpack checkpoint for MMPretrain',
        formatter_class=HelpFormatter)
    parser.add_argument('src', help='MoE Jetpack .pth')
    parser.add_argument('out', help='output weights (.pth)')
    parser.add_argument('--config-out', help='write the model config here')
    parser.add_argument(
        '--num-heads', type=int,
        help='attention heads (default: embed_dims // 64, e.g. ViT-T 3)')
    parser.add_argument(
        '--force', action='store_true', help='overwrite existing outputs')
    add_debug_arg(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from moe_plugin.converters.moejet import convert_moejet
    from moe_plugin.converters.output import (arch_text, build_checked_model,
                                              check_outputs, config_header,
                                              config_text, imagenet_meta,
                                              save_converted)
    check_outputs([args.out, args.config_out], args.force)
    state, model_cfg, arch = convert_moejet(args.src, args.num_heads)
    build_checked_model(model_cfg, state)
    config = None
    if args.config_out:
        header = config_header(
            HEADER,
            src=args.src,
            out=args.out,
            arch=arch_text(arch),
            heads=(f'--num-heads {args.num_heads}' if args.num_heads
                   else f'embed_dims // 64 = {arch.num_heads}'))
        config = config_text(model_cfg, arch.img_size, header)
    save_converted(state, args.out, config, args.config_out, args.force,
                   imagenet_meta(arch.num_classes))
    print(f'wrote {args.out}' +
          (f' and {args.config_out}' if args.config_out else '') +
          f': {arch.num_layers} blocks, MoE blocks {list(arch.moe_layers)} '
          f'({arch.core_experts} core + {arch.univ_experts} universal '
          f'experts), {arch.global_pool} pooling, {arch.num_classes} '
          f'classes, {len(state)} tensors')


if __name__ == '__main__':
    run_main(main)
