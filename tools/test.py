"""Test (and evaluate) a checkpoint (MMPretrain's ``tools/test.py`` plus).

Additions over MMPretrain's script: it imports ``moe_plugin`` (and works
from a clone without installation), loads the run checkpoints that
``tools/train.py`` writes under PyTorch >= 2.6 with a scoped allow-list
(``moe_plugin.compat``), runs distributed on CPU-only machines with gloo, and
changes the test-time routing of every MoE layer from the command line.

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
from copy import deepcopy

import mmengine
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.evaluator import DumpResults
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

# Run from a clone without installation: the repository root first.
REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


#: ``--eval-group-size image``: each image is its own routing group.
PER_IMAGE = 'image'


def group_size_arg(value):
    """``--eval-group-size``: a whole number >= 1, or ``image``."""
    if value == PER_IMAGE:
        return PER_IMAGE
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1 or str(number) != value:
        raise argparse.ArgumentTypeError(
            f'expected a whole number of images >= 1 or {PER_IMAGE!r}, got '
            f'{value!r}')
    return number


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a checkpoint')
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
        type=float,
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
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.out is None and args.out_item is not None:
        parser.error('--out-item needs --out')
    return args


def merge_args(cfg, args):
    """Merge the command line arguments into the config."""
    cfg.launcher = args.launcher

    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])

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

    if cfg.get('test_dataloader', None) is not None:
        import torch
        dataloader_cfg = ConfigDict(
            pin_memory=torch.cuda.is_available() and not args.no_pin_memory,
            collate_fn=dict(type='default_collate'))
        dataloader_cfg.update(deepcopy(cfg.test_dataloader))
        cfg.test_dataloader = dataloader_cfg

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
    # Registers moe_plugin's models, also for configs without
    # `custom_imports`.
    import moe_plugin  # noqa: F401
    from moe_plugin.compat import (allow_run_checkpoints,
                                   setup_cpu_distributed, teardown_distributed)
    from moe_plugin.engine import configure_expert_parallel

    cfg = Config.fromfile(args.config)
    cfg = merge_args(cfg, args)
    # Expert parallelism: its DDP wrapper and full experts in checkpoints.
    configure_expert_parallel(cfg)
    setup_cpu_distributed(cfg)

    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    allow_run_checkpoints(runner, 'load_checkpoint')
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
    main()
