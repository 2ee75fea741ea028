"""The main demo and the recycling benchmark: does recycling a dense
checkpoint pay?

``--dataset digits`` (the default, ``make demo``, a few minutes on a CPU):

1. Splits scikit-learn's digits into an upstream task (classes 0-4,
   ``data/digits_up``) and a downstream task (classes 5-9,
   ``data/digits_down``), both 80/20 train/val.
2. Pretrains a small dense ViT on the upstream task.
3. Recycles it with ``tools/gen_weight/gen_vit_moe_weight.py`` into a V-MoE
   (``upcycle``) and a dual-path SpheroMoE ViT (``importance``, calibrated
   on upstream images), each with a new head.
4. Fine-tunes on the downstream task, for the same number of epochs and
   evaluating after each: the V-MoE from scratch, the upcycled V-MoE, the
   recycled SpheroMoE, and the dense model itself (``dense_finetune``).
5. Prints a table of val top-1 per epoch and writes
   ``work_dirs/demo/summary.json``.

``--dataset fashion_mnist`` (``make benchmark-recycling``): the same four
downstream runs on Fashion-MNIST, for any two disjoint class subsets, with
several seeds (a new upstream model, training subset and initialisation
per seed) and, given several ``--train-images-per-class``, a sweep over the
downstream training-set size. Writes ``OUT/summary.json`` and
``OUT/curves.png`` (one size) or ``OUT/size_<N>/...`` plus
``OUT/size_sweep.json`` and ``OUT/size_sweep.png``, and prints the table of
:mod:`moe_plugin.analysis.recycling_report`. The data are gunzipped from
``--data-src`` (Debian's ``dataset-fashion-mnist``) when missing.

Every training runs on ``--gpus`` processes through tools/dist_train.sh
(gloo on CPUs). Usage::

    python tools/demo/recycling_demo.py [--gpus 2] [--work-dir work_dirs/demo]
    python tools/demo/recycling_demo.py --dataset fashion_mnist --seeds 3 \\
        [--upstream-classes 0 1 2 3 4] [--downstream-classes 5 6 7 8 9] \\
        [--epochs 16] [--train-images-per-class 100] [--out DIR]
"""
import argparse
import glob
import json
import os
import os.path as osp
import resource
import shutil
import socket
import subprocess
import sys
import time

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import HelpFormatter, add_debug_arg, run_main  # noqa: E402

CONFIGS = osp.join('configs', 'demo', 'recycling')
UPSTREAM, DOWNSTREAM = ('0', '1', '2', '3', '4'), ('5', '6', '7', '8', '9')


def split_digits(source: str, data_root: str) -> None:
    """Copy the digits' class folders into the upstream and downstream
    image folders (once; a complete copy is kept)."""
    for name, classes in (('digits_up', UPSTREAM), ('digits_down',
                                                    DOWNSTREAM)):
        target = osp.join(data_root, name)
        if osp.isdir(target):
            continue
        tmp = target + '.part'
        shutil.rmtree(tmp, ignore_errors=True)
        for split in ('train', 'val'):
            for cls in classes:
                shutil.copytree(
                    osp.join(source, split, cls), osp.join(tmp, split, cls))
        os.replace(tmp, target)


def free_port() -> int:
    """A free local TCP port for torchrun (29500 may be taken)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def run(command, log):
    """Run a step from the repository root, its output to ``log``."""
    print('$', ' '.join(command), flush=True)
    start = time.perf_counter()
    env = dict(os.environ)
    env.setdefault('PORT', str(free_port()))
    with open(log, 'w') as f:
        proc = subprocess.run(command, cwd=REPO_ROOT, stdout=f, env=env,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f'step failed ({proc.returncode}), see {log}:\n'
                         f'{tail}')
    return time.perf_counter() - start


def train(config, work_dir, gpus, *options):
    os.makedirs(work_dir, exist_ok=True)
    command = [
        osp.join('tools', 'dist_train.sh'), config,
        str(gpus), '--work-dir', work_dir
    ]
    if options:
        command += ['--cfg-options', *options]
    return run(command, osp.join(work_dir, 'demo_step.log'))


def val_top1(work_dir):
    """Val top-1 after each epoch, from the run's scalars.json."""
    (scalars, ) = sorted(
        glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))[-1:]
    rows = [json.loads(line) for line in open(scalars) if line.strip()]
    return [
        round(row['accuracy/top1'], 2) for row in rows
        if 'accuracy/top1' in row
    ]


def recycle(config, dense, method, out, *extra):
    command = [
        sys.executable,
        osp.join('tools', 'gen_weight', 'gen_vit_moe_weight.py'), config,
        '--dense', dense, '--method', method, '--out', out, '--fresh-head',
        '--force', *extra
    ]
    return run(command, osp.splitext(out)[0] + '.log')


def run_digits(args):
    """The digits demo (``make demo``)."""
    from moe_plugin.datasets import prepare_digits

    start = time.perf_counter()
    digits = prepare_digits(osp.join(args.data_root, 'digits'))
    split_digits(digits, args.data_root)
    work = args.work_dir
    weights = osp.join(work, 'weights')
    os.makedirs(weights, exist_ok=True)
    seconds = {}

    up = osp.join(work, 'dense_upstream')
    seconds['pretrain'] = train(
        osp.join(CONFIGS, 'vit-dense_2xb64_digits-up.py'), up, args.gpus)
    dense_upstream = val_top1(up)[-1]
    with open(osp.join(up, 'last_checkpoint')) as f:
        dense_ckpt = f.read().strip()

    runs = {
        'scratch': ('vmoe_2xb64_digits-down.py', None),
        'upcycle': ('vmoe_2xb64_digits-down.py', ('upcycle', )),
        'sphero_importance': ('spheromoe_2xb64_digits-down.py',
                              ('importance', '--calib-data',
                               osp.join(args.data_root, 'digits_up',
                                        'train'), '--num-calib-images',
                               '250')),
        'dense_finetune': ('vit-dense_2xb64_digits-down.py', ('upcycle', )),
    }
    curves = {}
    for name, (config, recycling) in runs.items():
        config = osp.join(CONFIGS, config)
        options = []
        if recycling is not None:
            out = osp.join(weights, f'{name}.pth')
            seconds[f'recycle_{name}'] = recycle(config, dense_ckpt,
                                                 recycling[0], out,
                                                 *recycling[1:])
            options = [f'load_from={out}']
        run_dir = osp.join(work, name)
        shutil.rmtree(run_dir, ignore_errors=True)
        seconds[name] = train(config, run_dir, args.gpus, *options)
        curves[name] = val_top1(run_dir)

    epochs = len(curves['scratch'])
    summary = dict(
        epochs=epochs,
        runs=curves,
        dense_upstream=round(dense_upstream, 2),
        seconds={k: round(v, 1)
                 for k, v in seconds.items()})
    tmp = osp.join(work, 'summary.json.part')
    with open(tmp, 'w') as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, osp.join(work, 'summary.json'))

    print(f'\nDense ViT on classes 0-4 (upstream): {dense_upstream:.2f} % '
          'val top-1\nDownstream (classes 5-9) val top-1 after each epoch:')
    print(f"{'run':<18}" + ''.join(f'{e:>7}' for e in range(1, epochs + 1)))
    for name, curve in curves.items():
        print(f'{name:<18}' + ''.join(f'{v:>7.1f}' for v in curve))
    final = curves['scratch'][-1]
    for name in ('upcycle', 'sphero_importance'):
        reach = next((e + 1 for e, v in enumerate(curves[name])
                      if v >= final), None)
        print(f'{name}: reaches scratch\'s final {final:.1f} % at epoch '
              f'{reach if reach else "never"} of {epochs}')
    print(f'\nsummary: {osp.abspath(osp.join(work, "summary.json"))} '
          f'({time.perf_counter() - start:.0f} s)')


def child_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def epoch_options(epochs):
    """--cfg-options giving a benchmark config ``epochs`` epochs (the
    cosine schedule after the 1-epoch warm-up follows)."""
    return [
        f'train_cfg.max_epochs={epochs}', f'param_scheduler.1.T_max='
        f'{epochs - 1}', f'param_scheduler.1.end={epochs}',
        f'default_hooks.checkpoint.interval={epochs}'
    ]


def data_options(classes, per_class, seed, test_per_class):
    """--cfg-options choosing a task's classes, its training subset
    (``per_class`` images of each class drawn with ``seed``; None: all)
    and its test subset (``test_per_class`` of each class, always drawn
    with seed 0: every run and seed sees the same test images)."""
    listed = '[' + ','.join(str(c) for c in classes) + ']'
    options = [
        f'train_dataloader.dataset.classes={listed}',
        f'train_dataloader.dataset.per_class={per_class}',
        f'train_dataloader.dataset.seed={seed}',
        f'model.head.num_classes={len(classes)}',
        f'data_preprocessor.num_classes={len(classes)}',
        f'randomness.seed={seed}',
    ]
    for loader in ('val_dataloader', 'test_dataloader'):
        options += [
            f'{loader}.dataset.classes={listed}',
            f'{loader}.dataset.per_class={test_per_class}',
            f'{loader}.dataset.seed=0'
        ]
    return options


def merged_config(config, options, out):
    """Write ``config`` with ``options`` applied to ``out`` (for the
    recycling tool, whose calibration reads the upstream training set)."""
    from mmengine.config import Config, DictAction
    cfg = Config.fromfile(config)
    parser = argparse.ArgumentParser()
    parser.add_argument('--o', nargs='+', action=DictAction)
    cfg.merge_from_dict(parser.parse_args(['--o', *options]).o)
    cfg.dump(out)
    return out


# run name -> (config, recycling method and its extra arguments or None)
FMNIST_RUNS = {
    'scratch': ('vmoe_2xb64_fmnist-down.py', None),
    'upcycle': ('vmoe_2xb64_fmnist-down.py', ('upcycle', )),
    'sphero_importance': ('spheromoe_2xb64_fmnist-down.py',
                          ('importance', '--num-calib-images', '250')),
    'dense_finetune': ('vit-dense_2xb64_fmnist-down.py', ('upcycle', )),
}


def run_fashion_mnist(args):
    """The Fashion-MNIST recycling benchmark."""
    from moe_plugin.analysis import recycling_report as report
    from moe_plugin.datasets import check_class_split, prepare_fashion_mnist
    from moe_plugin.fileio import atomic_write

    start, cpu_start = time.perf_counter(), child_cpu()
    check_class_split(args.upstream_classes, args.downstream_classes)
    if args.epochs < 2:
        raise SystemExit(f'--epochs must be >= 2, got {args.epochs}')
    root = osp.join(args.data_root, 'fashion_mnist')
    prepare_fashion_mnist(root, args.data_src)
    configs = osp.join('configs', 'benchmark', 'recycling')
    up_config = osp.join(configs, 'vit-dense_2xb64_fmnist-up.py')
    out = args.out
    seeds = list(range(args.seeds))
    sizes = args.train_images_per_class
    runs = {k: v for k, v in FMNIST_RUNS.items() if k in args.runs}
    up_test = max(1, args.test_images // len(args.upstream_classes))
    down_test = max(1, args.test_images // len(args.downstream_classes))
    seconds, cpu = {}, {}

    def timed(key, step, *step_args):
        cpu_before = child_cpu()
        seconds[key] = round(step(*step_args), 1)
        cpu[key] = round(child_cpu() - cpu_before, 1)

    dense_upstream = []
    curves = {size: {r: [] for r in runs} for size in sizes}
    for seed in seeds:
        seed_dir = osp.join(out, f'seed_{seed}')
        up_dir = osp.join(seed_dir, 'dense_upstream')
        up_options = data_options(
            args.upstream_classes, args.upstream_images_per_class, seed,
            up_test) + _root_options(root)
        if args.upstream_epochs:
            up_options += epoch_options(args.upstream_epochs) + [
                f'train_cfg.val_interval={args.upstream_epochs}'
            ]
        # Recycled weights are made once per seed, for every size.
        shutil.rmtree(osp.join(seed_dir, 'weights'), ignore_errors=True)
        if not (args.reuse_upstream
                and osp.exists(osp.join(up_dir, 'last_checkpoint'))):
            shutil.rmtree(up_dir, ignore_errors=True)
            timed(f'seed{seed}/pretrain', train, up_config, up_dir,
                  args.gpus, *up_options)
        dense_upstream.append(val_top1(up_dir)[-1])
        with open(osp.join(up_dir, 'last_checkpoint')) as f:
            dense_ckpt = f.read().strip()
        calib_config = merged_config(up_config, up_options,
                                     osp.join(seed_dir, 'upstream_config.py'))
        for size in sizes:
            size_dir = osp.join(seed_dir, f'size_{size}')
            options = data_options(args.downstream_classes, size, seed,
                                   down_test) + _root_options(root)
            options += epoch_options(args.epochs) + args.downstream_options
            for name, (config, recycling) in runs.items():
                config = osp.join(configs, config)
                run_options = list(options)
                if recycling is not None:
                    weights = osp.join(seed_dir, 'weights', f'{name}.pth')
                    if not osp.exists(weights):
                        extra = list(recycling[1:])
                        if recycling[0] == 'importance':
                            extra += ['--calib-data', calib_config]
                        os.makedirs(osp.dirname(weights), exist_ok=True)
                        timed(f'seed{seed}/recycle_{name}', recycle, config,
                              dense_ckpt, recycling[0], weights, '--seed',
                              str(seed), '--cfg-options', *options, *extra)
                    run_options.append(f'load_from={weights}')
                run_dir = osp.join(size_dir, name)
                shutil.rmtree(run_dir, ignore_errors=True)
                timed(f'seed{seed}/size{size}/{name}', train, config,
                      run_dir, args.gpus, *run_options)
                curves[size][name].append(val_top1(run_dir))
                print(f'seed {seed}, {size} images/class, {name}: '
                      f'{curves[size][name][-1][-1]:.2f} % top-1', flush=True)

    seconds['total'] = round(time.perf_counter() - start, 1)
    cpu['total'] = round(child_cpu() - cpu_start, 1)
    summaries = []
    for size in sizes:
        summary = dict(
            dataset='fashion_mnist',
            upstream_classes=list(args.upstream_classes),
            downstream_classes=list(args.downstream_classes),
            epochs=args.epochs,
            train_images_per_class=size,
            upstream_images_per_class=args.upstream_images_per_class,
            test_images=down_test * len(args.downstream_classes),
            seeds=seeds,
            dense_upstream=dense_upstream,
            runs=curves[size],
            seconds=seconds,
            cpu_seconds=cpu)
        summaries.append(summary)
        folder = out if len(sizes) == 1 else osp.join(out, f'size_{size}')
        _write_json(osp.join(folder, 'summary.json'), summary, atomic_write)
        report.plot_curves(summary, osp.join(folder, 'curves.png'))
        print('\n' + report.format_table(summary))
    if len(sizes) > 1:
        sweep = dict(train_images_per_class=sizes, summaries=summaries)
        _write_json(osp.join(out, 'size_sweep.json'), sweep, atomic_write)
        report.plot_size_sweep(sweep, osp.join(out, 'size_sweep.png'))
        print('\n' + report.format_sweep_table(sweep))
    print(f'\n{osp.abspath(out)}: {seconds["total"]:.0f} s wall, '
          f'{cpu["total"]:.0f} s CPU')


def _root_options(root):
    return [
        f'{loader}.dataset.data_root={root}'
        for loader in ('train_dataloader', 'val_dataloader',
                       'test_dataloader')
    ]


def _write_json(path, data, atomic_write):
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=1)

    atomic_write(path, write)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=HelpFormatter)
    parser.add_argument('--dataset', default='digits',
                        choices=['digits', 'fashion_mnist'])
    parser.add_argument('--gpus', type=int, default=2,
                        help='processes per training (GPUs, or CPU procs)')
    parser.add_argument('--work-dir', '--out', dest='out', default=None,
                        help='output folder (default work_dirs/demo, or '
                        'work_dirs/recycling_benchmark for fashion_mnist)')
    parser.add_argument('--data-root', default='data')
    fmnist = parser.add_argument_group('fashion_mnist only')
    fmnist.add_argument('--data-src', default='/usr/share/datasets/'
                        'fashion-mnist', help='folder of the four gzipped '
                        'IDX files (Debian: apt-get install '
                        'dataset-fashion-mnist)')
    fmnist.add_argument('--upstream-classes', type=int, nargs='+',
                        default=[0, 1, 2, 3, 4])
    fmnist.add_argument('--downstream-classes', type=int, nargs='+',
                        default=[5, 6, 7, 8, 9])
    fmnist.add_argument('--seeds', type=int, default=1,
                        help='number of seeds (0..N-1)')
    fmnist.add_argument('--epochs', type=int, default=16,
                        help='downstream epochs, the same for every run')
    fmnist.add_argument('--train-images-per-class', type=int, nargs='+',
                        default=[100], help='downstream training images '
                        'per class; several values make a size sweep')
    fmnist.add_argument('--upstream-images-per-class', type=int,
                        default=2000)
    fmnist.add_argument('--upstream-epochs', type=int, default=None,
                        help="default: the upstream config's (10)")
    fmnist.add_argument('--test-images', type=int, default=2000,
                        help='test images of each task (balanced; the same '
                        'for every run and seed)')
    fmnist.add_argument('--downstream-options', nargs='+', default=[],
                        metavar='KEY=VALUE',
                        help='--cfg-options for every downstream run alike '
                        '(a recipe change never favours one run)')
    fmnist.add_argument('--reuse-upstream', action='store_true',
                        help="keep each seed's upstream model found in OUT "
                        '(to compare downstream recipes)')
    fmnist.add_argument('--runs', nargs='+', default=list(FMNIST_RUNS),
                        choices=list(FMNIST_RUNS),
                        help='downstream runs (scratch is required)')
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)
    sys.path.insert(0, REPO_ROOT)
    if args.dataset == 'digits':
        args.work_dir = args.out or 'work_dirs/demo'
        run_digits(args)
    else:
        args.out = args.out or 'work_dirs/recycling_benchmark'
        if 'scratch' not in args.runs:
            raise SystemExit('--runs must include scratch (the reference '
                             'of the table)')
        run_fashion_mnist(args)


if __name__ == '__main__':
    run_main(main)
