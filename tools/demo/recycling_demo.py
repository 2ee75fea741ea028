"""The main demo: does recycling a dense checkpoint pay on a CPU?

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

Every training runs on ``--gpus`` processes through tools/dist_train.sh
(gloo on CPUs). Usage::

    python tools/demo/recycling_demo.py [--gpus 2] [--work-dir work_dirs/demo]
"""
import argparse
import glob
import json
import os
import os.path as osp
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


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=HelpFormatter)
    parser.add_argument('--gpus', type=int, default=2,
                        help='processes per training (GPUs, or CPU procs)')
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--data-root', default='data')
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)
    sys.path.insert(0, REPO_ROOT)
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


if __name__ == '__main__':
    run_main(main)
