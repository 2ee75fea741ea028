"""What MoERoutingLoggerHook costs a training iteration.

A training step (forward, loss, backward) of the digits demo V-MoE (4 blocks
of 64 dims, 2 MoE layers of 4 experts, 64 images of 32 px) plain, and as a
logging iteration of the hook (entropy hooks attached, the scalars gathered
and written by a ``LocalVisBackend``); median of ``--repeats`` runs after a
warm-up, both in one run. Iterations between logging ones run no hook code
at all, so the amortised cost at interval ``n`` is ``overhead / n``.

Usage::

    python benchmarks/routing_logger_hook.py [--threads 2] [--repeats 15] \
        [--json out.json]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
CONFIG = os.path.join(REPO_ROOT, 'configs', 'demo',
                      'vmoe-demo_2xb64_digits.py')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--json', help='write the results to this file')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mmengine.config import Config
    from mmengine.visualization import Visualizer
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample

    import moe_plugin  # noqa: F401
    from moe_plugin.engine import MoERoutingLoggerHook

    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(CONFIG).model)
    model.train()
    inputs = torch.randn(args.batch, 3, 32, 32)
    samples = [DataSample().set_gt_label(i % 10) for i in range(args.batch)]

    def step():
        losses = model.loss(inputs, samples)
        sum(v for k, v in losses.items() if 'loss' in k).backward()

    with tempfile.TemporaryDirectory() as tmp:
        visualizer = Visualizer(
            name='bench', vis_backends=[dict(type='LocalVisBackend')],
            save_dir=tmp)
        runner = SimpleNamespace(
            model=model, iter=0, visualizer=visualizer,
            logger=SimpleNamespace(warning=print))
        hook = MoERoutingLoggerHook(interval=1)
        hook.before_train(runner)

        def logged_step():
            hook.before_train_iter(runner, 0)
            step()
            hook.after_train_iter(runner, 0)

        times = {'plain': [], 'logging': []}
        for _ in range(3):
            step()
            logged_step()
        for _ in range(args.repeats):
            # Interleaved, so that machine noise hits both alike.
            for name, fn in (('plain', step), ('logging', logged_step)):
                start = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - start))
    plain = statistics.median(times['plain'])
    logging = statistics.median(times['logging'])
    overhead = 100 * (logging - plain) / plain
    result = dict(
        plain_ms=plain, logging_ms=logging, overhead_pct=overhead,
        amortised_pct={n: overhead / n for n in (10, 50)},
        threads=args.threads, batch=args.batch, repeats=args.repeats,
        torch=torch.__version__, machine=platform.processor() or
        platform.machine())
    print(f'{"step":<22}{"median ms":>10}')
    print(f'{"plain":<22}{plain:>10.1f}')
    print(f'{"logging iteration":<22}{logging:>10.1f}')
    print(f'overhead of a logging iteration: {overhead:+.1f} %; amortised '
          f'at interval 10: {overhead / 10:+.2f} %, 50: {overhead / 50:+.2f}'
          ' %')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
