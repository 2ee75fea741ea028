"""Test (and evaluate) a checkpoint (MMPretrain's ``tools/test.py`` plus).

Additions over MMPretrain's script (the set-up in
``moe_plugin.engine.runner_setup``, shared with ``tools/train.py``): it
imports ``moe_plugin`` (and works from a clone without installation), also
loads run checkpoints written before they were portable (scoped allow-list
of ``moe_plugin.compat``), runs distributed on CPU-only machines with gloo,
and changes the test-time routing of every MoE layer from the command line.
MMPretrain's own ``tools/test.py`` works on the same configs and run
checkpoints, without the ``--eval-*`` options.

Examples:
    python tools/test.py CONFIG work_dirs/x/epoch_30.pth
    python tools/test.py CONFIG CKPT --eval-capacity-factor 0.5 \\
        --eval-batch-priority on --eval-group-size 8
    tools/dist_test.sh CONFIG CKPT 8 --eval-top-k 1
"""
import argparse
import os
import os.path as osp
import sys

import mmengine
from mmengine.config import Config, DictAction
from mmengine.evaluator import DumpResults

# Run from a clone without installation: the repository root first.
REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import (PER_IMAGE, HelpFormatter,  # noqa: E402
                            add_debug_arg, capacity_factor_arg, group_size_arg,
                            run_main)
from moe_plugin.engine import runner_setup  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a checkpoint',
        formatter_class=HelpFormatter)
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the directory to save the evaluation metrics')
    parser.add_argument('--out', help='the file to output results to')
    parser.add_argument(
        '--out-item',
        choices=['metrics', 'pred'],
        help='whether --out gets the metrics or the predictions '
        '(default: predictions)')
    parser.add_argument(
        '--eval-top-k',
        type=int,
        help='experts per token at test time in every MoE layer')
    parser.add_argument(
        '--eval-capacity-factor',
        type=capacity_factor_arg,
        help='capacity factor at test time in every MoE layer')
    parser.add_argument(
        '--eval-group-size',
        type=group_size_arg,
        metavar='{N,image}',
        help='routing group at test time in every MoE layer: N images per '
        'group, or "image" for each image its own group (batch independent)')
    parser.add_argument(
        '--eval-batch-priority',
        choices=['on', 'off'],
        help='Batch Priority Routing at test time in every MoE layer')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value pairs merged into '
        'it, e.g. test_dataloader.batch_size=32')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='enable automatic-mixed-precision test')
    parser.add_argument(
        '--show-dir',
        help='directory where the visualization images will be saved')
    parser.add_argument(
        '--show',
        action='store_true',
        help='display the prediction results in a window')
    parser.add_argument(
        '--interval', type=int, default=1, help='visualize every n samples')
    parser.add_argument(
        '--wait-time',
        type=float,
        default=2,
        help='display time of every window (seconds)')
    parser.add_argument(
        '--no-pin-memory',
        action='store_true',
        help='disable the pin_memory option of the dataloaders')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.out is None and args.out_item is not None:
        parser.error('--out-item needs --out')
    return args


def merge_args(cfg, args):
    """Merge the command line arguments into the config."""
    cfg.launcher = args.launcher
    runner_setup.default_work_dir(cfg, args.config, args.work_dir)

    cfg.load_from = args.checkpoint
    cfg.resume = False

    if args.amp:
        cfg.test_cfg.fp16 = True

    if args.show or args.show_dir is not None:
        if 'visualization' not in cfg.default_hooks:
            raise ValueError('--show/--show-dir need a VisualizationHook in '
                             '`default_hooks.visualization` of the config')
        cfg.default_hooks.visualization.enable = True
        cfg.default_hooks.visualization.show = args.show
        cfg.default_hooks.visualization.wait_time = args.wait_time
        cfg.default_hooks.visualization.out_dir = args.show_dir
        cfg.default_hooks.visualization.interval = args.interval

    runner_setup.set_default_dataloader_cfg(
        cfg,
        'test_dataloader',
        pin_memory=not args.no_pin_memory,
        persistent_workers=None)

    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    return cfg


def apply_eval_routing(runner, args):
    """Apply ``--eval-*`` to every MoE layer of the runner's model.

    Returns:
        int: The number of MoE layers changed (0 without ``--eval-*``).
    """
    changes = dict(
        top_k=args.eval_top_k,
        capacity_factor=args.eval_capacity_factor,
        batch_priority=None if args.eval_batch_priority is None else
        args.eval_batch_priority == 'on')
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.eval_group_size is not None:
        changes['group_size'] = (None if args.eval_group_size == PER_IMAGE
                                 else args.eval_group_size)
    if not changes:
        return 0
    from moe_plugin.layers import set_eval_routing
    count = set_eval_routing(runner.model, **changes)
    if count == 0:
        raise ValueError(f'--eval-* options {changes} given but the model '
                         f'of {runner.cfg.filename} has no MoE layer')
    runner.logger.info(f'Test-time routing of {count} MoE layers: {changes}')
    return count


def main(argv=None):
    args = parse_args(argv)
    from moe_plugin.compat import teardown_distributed

    for what, path in (('config', args.config),
                       ('checkpoint', args.checkpoint)):
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} {path} does not exist')
    cfg = Config.fromfile(args.config)
    cfg = merge_args(cfg, args)
    runner = runner_setup.build_runner(cfg)
    apply_eval_routing(runner, args)

    if args.out and args.out_item in ('pred', None):
        runner.test_evaluator.metrics.append(
            DumpResults(out_file_path=args.out))

    metrics = runner.test()

    if args.out and args.out_item == 'metrics':
        mmengine.dump(metrics, args.out)
    teardown_distributed()
    return metrics


if __name__ == '__main__':
    run_main(main)
