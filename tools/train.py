"""Train a model from a config (MMPretrain's ``tools/train.py`` plus).

Additions over MMPretrain's script (the set-up in
``moe_plugin.engine.runner_setup``): it imports ``moe_plugin`` (and works
from a clone without installation), writes run checkpoints that load with
plain ``torch.load(weights_only=True)`` (``PortableCheckpointHook``), so
MMPretrain's inferencer and tools read them, trains distributed on CPU-only
machines with gloo, trains ``AmpOptimWrapper`` configs on a CPU in float32,
trains with expert parallelism when the model asks for it
(``MoEDistributedDataParallel`` and ``ExpertParallelHook`` are put into the
config), and prints where the checkpoint and the logs went. An expected
error is one line (``--debug`` for the traceback).

Examples:
    python tools/train.py configs/demo/vmoe-demo_2xb64_digits.py
    tools/dist_train.sh configs/vmoe/vmoe-s32-last2_8xb1024_in1k.py 8
    python tools/train.py CONFIG --resume            # latest in work_dir
    python tools/train.py CONFIG --resume work_dirs/x/iter_100.pth
    tools/dist_train.sh CONFIG 4 \
        --cfg-options model.backbone.moe_cfg.expert_parallel=True
"""
import argparse
import os
import os.path as osp
import sys

from mmengine.config import Config, DictAction

# Run from a clone without installation: the repository root first.
REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import HelpFormatter, add_debug_arg, run_main  # noqa: E402
from moe_plugin.engine import runner_setup  # noqa: E402
from moe_plugin.malloc import keep_freed_memory  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train a model', formatter_class=HelpFormatter)
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from the given checkpoint, or without a value from '
        'the latest checkpoint in the work directory')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='enable automatic-mixed-precision training')
    parser.add_argument(
        '--no-validate',
        action='store_true',
        help='do not evaluate the checkpoints during training')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate by the actual total batch size over '
        '`auto_scale_lr.base_batch_size`')
    parser.add_argument(
        '--no-pin-memory',
        action='store_true',
        help='disable the pin_memory option of the dataloaders')
    parser.add_argument(
        '--no-persistent-workers',
        action='store_true',
        help='disable the persistent_workers option of the dataloaders')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value pairs merged into '
        'it, e.g. train_cfg.max_epochs=10 "model.backbone.moe_layers=[1,3]"')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torchrun passes `--local-rank` (older launchers `--local_rank`).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def merge_args(cfg, args):
    """Merge the command line arguments into the config."""
    if args.no_validate:
        cfg.val_cfg = None
        cfg.val_dataloader = None
        cfg.val_evaluator = None

    cfg.launcher = args.launcher
    runner_setup.default_work_dir(cfg, args.config, args.work_dir)

    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    if args.auto_scale_lr:
        if cfg.get('auto_scale_lr', None) is None:
            raise ValueError('--auto-scale-lr needs `auto_scale_lr = '
                             'dict(base_batch_size=...)` in the config')
        cfg.auto_scale_lr.enable = True

    for field in runner_setup.DATALOADERS:
        runner_setup.set_default_dataloader_cfg(
            cfg,
            field,
            pin_memory=not args.no_pin_memory,
            persistent_workers=not args.no_persistent_workers)

    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    # Run checkpoints that MMPretrain's APIs load as they are.
    runner_setup.ensure_portable_checkpoints(cfg)
    return cfg


def report(runner):
    """Print the work directory, the last checkpoint and the log file."""
    if runner.rank != 0:
        return
    last = osp.join(runner.work_dir, 'last_checkpoint')
    if osp.isfile(last):
        with open(last) as f:
            checkpoint = f.read().strip()
    else:
        checkpoint = '(none saved)'
    log_file = osp.join(runner.log_dir, f'{runner.timestamp}.log')
    print(f'work_dir:   {osp.abspath(runner.work_dir)}\n'
          f'checkpoint: {checkpoint}\n'
          f'log:        {osp.abspath(log_file)}',
          flush=True)


def main(argv=None):
    args = parse_args(argv)
    # A CPU step's large tensors come from the heap and are reused step to
    # step instead of being mapped afresh (moe_plugin/malloc.py).
    keep_freed_memory()
    from moe_plugin.compat import teardown_distributed

    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config {args.config} does not exist')
    cfg = Config.fromfile(args.config)
    cfg = merge_args(cfg, args)
    runner = runner_setup.build_runner(cfg)
    runner.train()
    report(runner)
    teardown_distributed()


if __name__ == '__main__':
    run_main(main)
