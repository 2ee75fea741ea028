"""V-JetMoE-T training steps: MoE Jetpack's own model code against ours.

MoE Jetpack's model code is imported from a checkout the user fetched
(``--moejet-src DIR``, the root of github.com/Adlith/MoE-Jetpack; nothing of
it is vendored here; it needs the ``entmax`` package). Its
``VisionTransformerMoe`` is built with the arguments of its
``moejet/configs/timm/vit_tiny_dual_moe_timm_scratch.py`` (ViT-T, 98 core +
196 universal experts of 1 slot in blocks 6-11, slot LayerNorm, noise,
expert dropout 0.4, MoE drop path 0.1, drop path 0.1, average pooling); ours
is ``configs/_base_/models/moejet-vit-t-dual.py`` with the same rates. Both
get the same images, labels, threads and optimizer (AdamW, ``--optimizer``)
and are timed in turn in every round (median of ``--repeats``).

Usage::

    python benchmarks/moejet_side_by_side.py --moejet-src DIR [--batch 8] \
        [--threads 2] [--repeats 5] [--optimizer fused|default] \
        [--device cpu] [--json out.json]
"""
import argparse
import copy
import importlib
import os.path as osp
import statistics
import sys
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import models as model_bench  # noqa: E402
from report import report  # noqa: E402
from timing import interleaved_times  # noqa: E402

from moe_plugin.malloc import keep_freed_memory  # noqa: E402

#: MoE Jetpack's ViT-T dual-path arguments (its scratch config).
MOEJET_KWARGS = dict(
    patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=1000,
    global_pool='avg', moe_layers=[6, 7, 8, 9, 10, 11], slots_per_expert=1,
    num_experts=197, if_dualpath=True, core_experts=98, univ_experts=196,
    univ_factor=1 / 4, slot_layernorm=True, layer_scale=False,
    moe_droprate=0.4, moe_drop_path_rate=0.1, drop_path_rate=0.1,
    add_noise=True, noise_mult=1 / (98 + 196), moe_logits_drop=0.0)


def import_moejet(src: str):
    """MoE Jetpack's ``vit_softmoe_timm`` module from a checkout, without
    running its package ``__init__`` (which registers MMEngine hooks)."""
    models_dir = osp.join(osp.abspath(src), 'moejet', 'models')
    if not osp.isfile(osp.join(models_dir, 'vit_softmoe_timm.py')):
        raise FileNotFoundError(
            f'--moejet-src {src!r}: no moejet/models/vit_softmoe_timm.py '
            'there (give the root of a MoE-Jetpack checkout)')
    package = types.ModuleType('_moejet_models')
    package.__path__ = [models_dir]
    sys.modules['_moejet_models'] = package
    return importlib.import_module('_moejet_models.vit_softmoe_timm')


class OursClassifier(model_bench.Classifier):
    """Our V-JetMoE-T with MoE Jetpack's training rates (dropouts on)."""

    def __init__(self):
        moe, _, aux = model_bench.backbone_cfgs('vjetmoe-t')
        model = model_bench.load_model_cfg('moejet-vit-t-dual.py')
        trained = copy.deepcopy(model.backbone.to_dict())
        for key in ('drop_path_rate', 'moe_drop_path_rate', 'moe_cfg'):
            if key in trained:
                moe[key] = trained[key]
        super().__init__(moe, aux)


def moejet_step(model, optimizer, images, labels):
    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def ours_step(model, optimizer, images, labels):
    def step():
        optimizer.zero_grad(set_to_none=True)
        model(images, labels).backward()
        optimizer.step()

    return step


def run(src, batch, threads, repeats, optimizer, device, warmup=2):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = import_moejet(src)
    theirs = module.VisionTransformerMoe(**MOEJET_KWARGS)
    ours = OursClassifier()
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch, ), device=device)
    steps, params = [], []
    for model, make in ((ours, ours_step), (theirs, moejet_step)):
        model.to(device).train()
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-4,
                                  **model_bench.OPTIMIZERS[optimizer])
        step = make(model, adamw, images, labels)
        if device.type == 'cuda':
            step = _synchronised(step)
        steps.append(step)
        params.append(sum(p.numel() for p in model.parameters()))
    times = interleaved_times(steps, repeats, warmup)
    ours_s, theirs_s = (statistics.median(t) for t in times)
    return dict(
        model='V-JetMoE-T',
        batch=batch,
        ours_ms=round(ours_s * 1e3, 1),
        moejet_ms=round(theirs_s * 1e3, 1),
        speedup=round(statistics.median(
            t / o for o, t in zip(*times)), 3),
        ours_params_m=round(params[0] / 1e6, 2),
        moejet_params_m=round(params[1] / 1e6, 2),
        optimizer=optimizer,
        threads=threads,
        device=str(device),
        repeats=repeats)


def _synchronised(step):
    def run_step():
        step()
        torch.cuda.synchronize()

    return run_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--moejet-src', required=True,
                        help='root of a MoE-Jetpack checkout')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--optimizer', default='fused',
                        choices=sorted(model_bench.OPTIMIZERS))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json', help='write the row to this JSON file')
    args = parser.parse_args()
    # Large blocks from the heap, reused step to step (moe_plugin/malloc.py).
    keep_freed_memory()
    if args.repeats < 5:
        parser.error('--repeats must be >= 5')
    row = run(args.moejet_src, args.batch, args.threads, args.repeats,
              args.optimizer, torch.device(args.device))
    print(f'torch {torch.__version__}, {args.threads} threads, '
          f'{args.device}, {args.optimizer} AdamW; speedup = MoE Jetpack '
          'step / ours')
    report([row], ('model', 'batch', 'ours_ms', 'moejet_ms', 'speedup',
                   'ours_params_m', 'moejet_params_m'), 15, args.json)


if __name__ == '__main__':
    main()
