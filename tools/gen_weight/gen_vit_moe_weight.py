"""Recycle a dense ViT checkpoint into an MoE model's initial weights.

The config may be a classifier's (MMPretrain), a detector's (MMDetection)
or a segmentor's (MMSegmentation): the model is built in the config's
``default_scope`` and its ``backbone`` (a ``VisionMoE``, ``VisionMoEPyramid``
or ``ConvNeXtMoE``; for the last a dense timm / MMPretrain ConvNeXt and the
methods without calibration) is filled; necks and heads keep their own
initialisation.

Examples:
    python tools/gen_weight/gen_vit_moe_weight.py \\
        configs/vmoe/vmoe-s32-last2_8xb1024_in1k.py --dense vit_s32.pth \\
        --method upcycle --out weights/vmoe-s32_upcycled.pth
    python tools/gen_weight/gen_vit_moe_weight.py CONFIG --dense vit.npz \\
        --method importance --calib-data data/imagenet/train \\
        --num-calib-images 512

    python tools/gen_weight/gen_vit_moe_weight.py \\
        configs/det/mask-rcnn_vmoe-b16-sfp_8xb8-100e_coco.py \\
        --dense vit_b16.pth --out weights/mask-rcnn_vmoe-b16_upcycled.pth

The output loads strictly into the config's model (`load_from`); a JSON
report beside it lists the keys copied, sampled and left fresh, the source
file's sha256 and format, the method, the seed, each expert's hidden-neuron
indices and the timings.
"""
import argparse
import os.path as osp
import shlex
import sys
import time

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import HelpFormatter, add_debug_arg, run_main  # noqa: E402

METHOD_HELP = """methods:
  upcycle     every expert a copy of the block's dense MLP (Sparse Upcycling)
  random      each expert an independent random subset of the hidden neurons
  uniform     evenly spaced hidden neurons, the same for every expert
  importance  neurons drawn in proportion to their activation on calibration
              images (--importance l1|l2|freq; --importance-select sample|top)
  graph       co-activation graph of the neurons on calibration images, cut
              into one group per expert (--graph louvain|spectral|metis),
              filled to the expert width by importance

A dense model wider than the target (ViT-S into a ViT-T-width MoE) is first
narrowed by channel selection: the same embedding channels for the whole
model (by calibrated importance, evenly spaced for uniform, at random for
random, else by LayerNorm gains) and whole attention heads per block.
--trunk NARROW.pth instead takes every tensor but the experts from NARROW
and cuts each expert with its own channels from --dense (MoE Jetpack's
original layout, for comparison).
"""


def parse_args(argv=None):
    from mmengine.config import DictAction

    from moe_plugin.recycling.methods import (GRAPHS, IMPORTANCE, METHODS,
                                              SELECTIONS)
    parser = argparse.ArgumentParser(
        description='Recycle a dense ViT checkpoint into MoE weights',
        epilog=METHOD_HELP,
        formatter_class=HelpFormatter)
    parser.add_argument('config', help='config whose model is the MoE target')
    parser.add_argument(
        '--dense', required=True,
        help='dense checkpoint: timm .pth/.safetensors, big_vision .npz or '
        'MMPretrain .pth')
    parser.add_argument(
        '--dense-format', choices=['timm', 'big_vision', 'mmpretrain'],
        help='force the format (detected from the file by default)')
    parser.add_argument(
        '--trunk',
        help='a dense checkpoint of the target width for every tensor but '
        "the experts (MoE Jetpack's original layout)")
    parser.add_argument(
        '--trunk-format', choices=['timm', 'big_vision', 'mmpretrain'],
        help='force the format of --trunk')
    parser.add_argument(
        '--dense-heads', type=int,
        help='attention heads of a wider --dense when the file does not '
        "store them (default: its width over the target's head width)")
    parser.add_argument(
        '--method', default='upcycle',
        choices=METHODS,
        help='how experts are made from the dense MLPs (see below)')
    parser.add_argument('--out', help='output file (default: weights/'
                        '<config name>_<method>.pth)')
    parser.add_argument(
        '--calib-data',
        help='calibration images: an image folder root/<class>/<image> or '
        'an MMPretrain config (its training set, read with its test '
        'pipeline)')
    parser.add_argument('--num-calib-images', type=int, default=256)
    parser.add_argument(
        '--calib-classes', type=int,
        help='the calibration data must cover this many classes')
    parser.add_argument('--importance', default='l2', choices=IMPORTANCE)
    parser.add_argument('--importance-select', default='sample',
                        choices=SELECTIONS)
    parser.add_argument('--graph', default='louvain', choices=GRAPHS)
    parser.add_argument('--noise', type=float, default=0.0,
                        help='std of noise added to the expert kernels')
    parser.add_argument(
        '--fresh-head', action='store_true',
        help="keep the target's own head initialisation (a new task), even "
        "when the dense head's shape fits")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--batch-size', type=int, default=32,
                        help='calibration batch size')
    parser.add_argument('--device', default='cpu',
                        help='device for calibration (cpu, cuda)')
    parser.add_argument('--safetensors', action='store_true',
                        help='write .safetensors instead of .pth')
    parser.add_argument('--force', action='store_true',
                        help='overwrite an existing output')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config')
    add_debug_arg(parser)
    return parser.parse_args(argv)


def output_paths(args):
    """``(weights, report)`` paths as ``save_recycled`` writes them."""
    out = args.out or osp.join(
        'weights',
        f'{osp.splitext(osp.basename(args.config))[0]}_{args.method}.pth')
    if args.safetensors and not out.endswith('.safetensors'):
        out = osp.splitext(out)[0] + '.safetensors'
    return out, osp.splitext(out)[0] + '.json'


def check_args(args):
    """The checks that need no model, before it is built: the inputs
    exist, a calibrated method has its images, the outputs are free."""
    from moe_plugin.fileio import check_outputs
    from moe_plugin.recycling import CALIBRATED
    for flag, path in (('config', args.config), ('--dense', args.dense),
                       ('--trunk', args.trunk)):
        if path is not None and not osp.isfile(path):
            raise FileNotFoundError(f'{flag} {path} does not exist')
    if args.method in CALIBRATED:
        if args.calib_data is None:
            raise ValueError(f'--method {args.method} needs --calib-data (an '
                             'image folder or a dataset config)')
        if not osp.exists(args.calib_data):
            raise FileNotFoundError(
                f'--calib-data {args.calib_data} does not exist')
    if args.num_calib_images < 1:
        raise ValueError(f'--num-calib-images must be >= 1, got '
                         f'{args.num_calib_images}')
    check_outputs(output_paths(args), args.force)


def calibration_batches(args, cfg, backbone):
    """``(batches, count)`` of normalised calibration images."""
    from moe_plugin.recycling import calibration
    if args.calib_data.endswith('.py'):
        return calibration.dataset_config_batches(
            args.calib_data, args.num_calib_images, args.seed,
            args.calib_classes, args.batch_size)
    samples = calibration.image_folder_samples(args.calib_data)
    indices = calibration.balanced_choice([s[1] for s in samples],
                                          args.num_calib_images, args.seed,
                                          args.calib_classes)
    preprocessor = cfg.get('data_preprocessor', {})
    mean = preprocessor.get('mean', [123.675, 116.28, 103.53])
    std = preprocessor.get('std', [58.395, 57.12, 57.375])
    return calibration.folder_batches(samples, indices,
                                      backbone.img_size[0], mean, std,
                                      args.batch_size), len(indices)


def layout_line(report, trunk, trunk_path):
    """How the widths were matched, for the summary."""
    if trunk is not None:
        return (f'layout:  trunk from {trunk_path} ({trunk.fmt}); each '
                'expert with its own channels of the dense model\n')
    if 'channels' in report:
        return (f"channels: {len(report['channels'])} of "
                f"{report['dense_width']} kept for the whole model (ranked "
                f"by {report['channel_scores']}), heads chosen whole "
                f"({report['dense_heads']} dense)\n")
    return ''


def recycle_convnext(args, model):
    """State, report and summary lines for a ``ConvNeXtMoE`` backbone."""
    from moe_plugin import recycling
    if args.method in recycling.CALIBRATED or args.trunk:
        raise ValueError('a ConvNeXtMoE target takes --method upcycle, '
                         'random or uniform, without --trunk')
    dense = recycling.load_dense_convnext(args.dense, args.dense_format)
    state, report = recycling.recycle_convnext_model(
        dense, model, fresh_head=args.fresh_head, method=args.method,
        noise=args.noise, seed=args.seed)
    source = f'{args.dense} ({dense.fmt}, ConvNeXt)'
    target = f'MoE blocks per stage {model.backbone.moe_blocks}'
    return state, report, dense.fmt, source, target


def build_model(cfg):
    """The config's model, built in its registry scope (``mmpretrain``,
    ``mmdet`` or ``mmseg``)."""
    from mmengine.registry import MODELS, DefaultScope

    from moe_plugin.models.backbones.common import LOADING_INITS
    model_cfg = cfg.model.copy()
    model_cfg.pop('init_cfg', None)
    # This tool does what a RecycleDenseInit of the backbone would.
    backbone_init = model_cfg.get('backbone', {}).get('init_cfg')
    if backbone_init:
        inits = [
            c for c in (backbone_init if isinstance(backbone_init, list)
                        else [backbone_init])
            if c.get('type') not in LOADING_INITS
        ]
        model_cfg.backbone.init_cfg = inits or None
    with DefaultScope.overwrite_default_scope(
            cfg.get('default_scope', 'mmpretrain')):
        return MODELS.build(model_cfg)


def command_line(argv) -> str:
    """The command line of this run, shell-quoted (for the report)."""
    return ' '.join(
        shlex.quote(a)
        for a in [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv))


def save_with_meta(args, cfg, model, state, report, out):
    """Save ``state`` with the class names of the config or of the dense
    checkpoint (when its head is kept); ``(weights, report)`` paths."""
    from moe_plugin import recycling
    from moe_plugin.datasets.meta import (checkpoint_classes, config_classes,
                                          model_num_classes, weights_meta)
    head_kept = not any(k.startswith('head.') for k in report['fresh'])
    num_classes = model_num_classes(model)
    meta = weights_meta(num_classes, config_classes(cfg, num_classes or 0),
                        checkpoint_classes(args.dense) if head_kept else None)
    report['classes'] = len(meta.get('dataset_meta', {}).get('classes', ()))
    return recycling.save_recycled(state, report, out, args.force,
                                   args.safetensors, meta)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    import torch
    from mmengine.config import Config

    from moe_plugin import recycling
    from moe_plugin.cli import quiet_mmengine
    from moe_plugin.recycling.channels import dense_num_heads

    start = time.perf_counter()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    out, _ = output_paths(args)
    # The fresh parameters (routers, slots, a new head) come from the
    # target's own initialisation: seeded, so that a run is reproducible.
    torch.manual_seed(args.seed)
    with quiet_mmengine():
        model = build_model(cfg)
        model.init_weights()
    backbone = model.backbone
    if hasattr(backbone, 'moe_blocks'):
        state, report, fmt, source, target = recycle_convnext(args, model)
        model.load_state_dict(state, strict=True)
        report.update(
            source=osp.abspath(args.dense),
            sha256=recycling.sha256(args.dense), format=fmt,
            config=osp.abspath(args.config), method=args.method,
            seed=args.seed, noise=args.noise,
            cfg_options=args.cfg_options or {}, command=command_line(argv),
            torch=torch.__version__,
            seconds=dict(total=round(time.perf_counter() - start, 3)))
        weights, report_path = save_with_meta(args, cfg, model, state,
                                              report, out)
        print(f'source:  {source}\ntarget:  {args.config} ({target})\n'
              f'method:  {args.method}\n'
              f"keys:    {len(report['copied'])} copied, "
              f"{len(report['sampled'])} sampled, {len(report['fresh'])} "
              f'fresh\nweights: {weights}\nreport:  {report_path}')
        return
    if not hasattr(backbone, 'moe_layers'):
        raise ValueError(f'the model of {args.config} has a '
                         f'{type(backbone).__name__} backbone; the target '
                         'must be a VisionMoE or ConvNeXtMoE')
    dense = recycling.load_dense_vit(args.dense, args.dense_format)
    trunk = None
    if args.trunk:
        trunk = recycling.load_dense_vit(args.trunk, args.trunk_format)
    loaded = time.perf_counter()

    stats = None
    count = 0
    calib_seconds = 0.0
    if args.method in recycling.CALIBRATED:
        # Recycling checks the models again; a mismatch fails here first,
        # before the calibration pass.
        recycling.check_sources(dense, backbone, trunk)
        target_heads = backbone.layers[0].attn.num_heads
        wider = dense.embed_dims != backbone.embed_dims
        dense_heads = target_heads
        if wider:
            dense_heads = dense_num_heads(
                dense, backbone.embed_dims // target_heads, args.dense_heads)
        dense_model = recycling.build_dense_vit(dense, backbone,
                                                dense_heads).to(args.device)
        batches, count = calibration_batches(args, cfg, backbone)
        if count < args.num_calib_images:
            print(f'warning: --num-calib-images {args.num_calib_images} '
                  f'asked, {args.calib_data} gives {count}; calibrating on '
                  f'{count}', file=sys.stderr, flush=True)
        calib_start = time.perf_counter()
        stats = recycling.calibrate(
            dense_model, (b.to(args.device) for b in batches),
            backbone.moe_layers, coactivation=args.method == 'graph',
            total=count, channels=wider)
        calib_seconds = time.perf_counter() - calib_start
    state, report = recycling.recycle(
        dense, model, fresh_head=args.fresh_head, method=args.method,
        stats=stats, noise=args.noise,
        seed=args.seed, importance=args.importance,
        selection=args.importance_select, graph=args.graph, trunk=trunk,
        dense_heads=args.dense_heads)
    model.load_state_dict(state, strict=True)  # fits the target exactly
    report.update(
        source=osp.abspath(args.dense),
        sha256=recycling.sha256(args.dense),
        format=dense.fmt,
        trunk=None if trunk is None else dict(
            source=osp.abspath(args.trunk),
            sha256=recycling.sha256(args.trunk),
            format=trunk.fmt),
        config=osp.abspath(args.config),
        method=args.method,
        seed=args.seed,
        noise=args.noise,
        importance=args.importance if args.method in
        recycling.CALIBRATED else None,
        graph=args.graph if args.method == 'graph' else None,
        num_calib_images=count,
        num_calib_images_asked=args.num_calib_images if stats else 0,
        cfg_options=args.cfg_options or {},
        command=command_line(argv),
        torch=torch.__version__,
        seconds=dict(
            load=round(loaded - start, 3),
            calibration=round(calib_seconds, 3),
            total=round(time.perf_counter() - start, 3)))
    weights, report_path = save_with_meta(args, cfg, model, state, report,
                                          out)
    print(f'source:  {args.dense} ({dense.fmt}, {dense.num_layers} blocks, '
          f'width {dense.embed_dims})\n'
          f'target:  {args.config} (MoE blocks {list(backbone.moe_layers)})\n'
          f'method:  {args.method}\n'
          f'{layout_line(report, trunk, args.trunk)}'
          f"keys:    {len(report['copied'])} copied, "
          f"{len(report['sampled'])} sampled, {len(report['fresh'])} fresh "
          f"({', '.join(report['fresh'][:6])}"
          f"{', ...' if len(report['fresh']) > 6 else ''})\n"
          f"time:    {report['seconds']['total']} s "
          f'(calibration {calib_seconds:.1f} s)\n'
          f'weights: {weights}\nreport:  {report_path}')


if __name__ == '__main__':
    run_main(main)
