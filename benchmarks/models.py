"""Whole-model training steps: an MoE ViT against its dense twin (spec 05).

For each preset the MoE backbone is built from one of our model configs
(``configs/_base_/models/``) and its dense twin from the same config with
``moe_layers=None`` (MMPretrain's ViT of the same size); both get a linear
1000-class head, cross-entropy (plus the config's auxiliary losses for the
MoE) and AdamW. A training step is forward, backward and the optimizer step.
The two steps are timed in turn in every round (median of ``--repeats``
after a warm-up), so that they share the machine's noise.

Columns: images/s of both, ``time_ratio`` (MoE step time / dense step
time), ``flops_ratio`` (analytic forward FLOPs, MoE / dense: matmuls and
attention; the experts counted over their whole static buffer of ``E * C``
slots, padding included, as computed), and ``overhead = time_ratio /
flops_ratio``: how much of the extra time is not explained by the extra
arithmetic (spec 05's goal: <= 1.05). Memory: on CUDA the peak allocated
during a step; on a CPU the bytes of the tensors saved for the backward
(activations, measured with ``saved_tensors_hooks``, the weights left
out) plus the weights,
gradients and two Adam moments (``state_mb``).

Presets (dropout and drop path off in both models, so that the step is
compute only):

- ``vmoe-tiny``: V-MoE S/32's layout shrunk for CPUs (D = 192, 4 blocks,
  64 px, patch 8: 65 tokens; MoE in blocks 1 and 3, E = 8, K = 2,
  c = 1.05, groups of 8 images), batch 16.
- ``vmoe-s32``: V-MoE S/32 last-2 (``vmoe-s32-last2.py``), batch 8 on a
  CPU, 1024 on a GPU.
- ``vjetmoe-t``: MoE Jetpack's V-JetMoE-T (``moejet-vit-t-dual.py``: 98
  core + 196 universal experts, entmax-1.5) against ViT-T, batch 8 / 256.
- ``vmoe-b16``: V-MoE B/16 every-2 (``vmoe-b16-every2.py``) against
  ViT-B/16, batch 2 / 256 (spec 05's GPU row).

The optimizer is AdamW, ``fused=True`` as in our schedules' configs
(``--optimizer default`` for torch's default, a for-loop on a CPU). Each
row also gives each step's matmul FLOPs and least memory traffic
(``moe_gflop``, ``moe_mb``, ``dense_gflop``, ``dense_mb``; see
``benchmarks/cost.py``), from which ``benchmarks/roofline.py`` computes the
floors.

Usage::

    python benchmarks/models.py [--preset vmoe-tiny vmoe-s32] \
        [--batch N] [--threads 2] [--repeats 5] [--device cuda] [--amp] \
        [--compile] [--optimizer fused|default] [--json out.json]
"""
import argparse
import contextlib
import copy
import os.path as osp
import platform
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from cost import step_cost  # noqa: E402
from memory import saved_bytes  # noqa: E402
from report import report  # noqa: E402
from timing import interleaved_times  # noqa: E402

import moe_plugin  # noqa: E402,F401  (registers the models)
from moe_plugin.layers import MoELayer, SparseMoE  # noqa: E402
from moe_plugin.malloc import keep_freed_memory  # noqa: E402

NUM_CLASSES = 1000

#: name -> (model config, backbone overrides, CPU batch, GPU batch)
PRESETS = {
    'vmoe-tiny': ('vmoe-s32-last2.py',
                  dict(arch=dict(embed_dims=192, num_layers=4, num_heads=3,
                                 feedforward_channels=768),
                       img_size=64, patch_size=8), 16, 1024),
    'vmoe-s32': ('vmoe-s32-last2.py', {}, 8, 1024),
    'vjetmoe-t': ('moejet-vit-t-dual.py', {}, 8, 256),
    'vmoe-b16': ('vmoe-b16-every2.py', {}, 2, 256),
}

#: Training-time randomness switched off in both models.
NO_DROPOUT = dict(drop_rate=0.0, drop_path_rate=0.0)

#: --optimizer -> AdamW keyword arguments.
OPTIMIZERS = {'fused': dict(fused=True), 'default': {}}


def load_model_cfg(name: str):
    """``model`` of ``configs/_base_/models/<name>``."""
    from mmengine.config import Config
    return Config.fromfile(
        osp.join(REPO_ROOT, 'configs', '_base_', 'models', name)).model


def backbone_cfgs(preset: str):
    """The MoE backbone config, its dense twin's, and the aux weights."""
    name, overrides, _, _ = PRESETS[preset]
    model = load_model_cfg(name)
    moe = copy.deepcopy(model.backbone.to_dict())
    moe.update(overrides, **NO_DROPOUT)
    moe_cfg = moe.get('moe_cfg', {})
    for key in ('expert_drop', ):
        if key in moe_cfg:
            moe_cfg[key] = 0.0
    if 'moe_drop_path_rate' in moe:
        moe['moe_drop_path_rate'] = 0.0
    dense = dict(moe, moe_layers=None)
    dense.pop('moe_cfg', None)
    dense.pop('moe_drop_path_rate', None)
    aux = dict(model.get('aux_loss_weights', {}) or {})
    return moe, dense, aux


class Classifier(nn.Module):
    """Backbone + linear head; the loss adds the MoE layers' aux losses."""

    def __init__(self, backbone_cfg: dict, aux_weights: dict):
        super().__init__()
        from mmpretrain.registry import MODELS
        self.backbone = MODELS.build(backbone_cfg)
        self.head = nn.Linear(self.backbone.embed_dims, NUM_CLASSES)
        self.aux_weights = {k: v for k, v in aux_weights.items() if v}
        self.moe = [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(self, images, labels):
        feats = self.backbone(images)[-1]
        if isinstance(feats, (tuple, list)):
            feats = feats[-1]
        loss = F.cross_entropy(self.head(feats).float(), labels)
        for layer in self.moe:
            for key, weight in self.aux_weights.items():
                value = layer.moe_metrics.get(f'{key}_loss')
                if value is not None:
                    loss = loss + weight * value
        return loss


# -- analytic FLOPs ---------------------------------------------------------
def layer_flops(layer: nn.Module, tokens: int, dims: int,
                batch: int) -> float:
    """Forward FLOPs per image of an FFN (dense or MoE) on ``tokens``."""
    if isinstance(layer, SparseMoE):
        group_images = layer.routing_options()['group_size'] or 1
        capacity = layer.capacity_for(group_images * tokens)
        if capacity is None:  # dropless: K rows per token, a lower bound (the
            # buffer pads every expert to the batch's largest load)
            rows = layer.routing_options()['top_k'] * tokens
        else:
            rows = layer.num_experts * capacity / group_images
        hidden = layer.experts.w1.shape[-1]
        return 2 * tokens * dims * layer.num_experts + 4 * dims * hidden * rows
    if isinstance(layer, MoELayer):  # Soft MoE, SpheroMoE
        slots = layer.num_experts * layer.slots_per_expert
        mixing = 2 * tokens * dims * slots * 3  # logits, dispatch, combine
        experts = sum(4 * dims * g.w1.shape[-1] * g.w1.shape[0] *
                      layer.slots_per_expert
                      for g in layer.expert_groups().values())
        return mixing + experts
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    return sum(2 * tokens * m.in_features * m.out_features for m in linears)


def model_flops(model: Classifier, batch: int) -> float:
    """Forward FLOPs per image: patch embedding, attention, FFNs, head."""
    backbone = model.backbone
    dims = backbone.embed_dims
    patches = backbone.patch_resolution[0] * backbone.patch_resolution[1]
    tokens = patches + backbone.num_extra_tokens
    conv = backbone.patch_embed.projection
    flops = 2 * patches * conv.weight[0].numel() * dims
    for block in backbone.layers:
        flops += 2 * tokens * dims * 4 * dims  # qkv and projection
        flops += 4 * tokens * tokens * dims  # scores and weighted sum
        flops += layer_flops(block.ffn, tokens, dims, batch)
    return flops + 2 * dims * NUM_CLASSES


# -- memory -----------------------------------------------------------------
def state_bytes(model: nn.Module) -> int:
    """Weights, gradients and two Adam moments."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


# -- timing -----------------------------------------------------------------
def make_step(model, optimizer, images, labels, amp, device, optimize=True):
    def step(record=None):
        optimizer.zero_grad(set_to_none=True)
        ctx = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
               if amp else contextlib.nullcontext())
        meter = saved_bytes(record, model) if record is not None else \
            contextlib.nullcontext()
        with ctx, meter:
            loss = model(images, labels)
        loss.backward()
        if optimize:
            optimizer.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()

    return step


def peak_memory_mb(step, model, device) -> float:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() / 2**20
    record = []
    step(record)
    return (record[0] + state_bytes(model)) / 2**20


def run_preset(preset, batch, device, amp, compile_model, repeats,
               optimize=True, warmup=2, optimizer='fused'):
    moe_cfg, dense_cfg, aux = backbone_cfgs(preset)
    torch.manual_seed(0)
    models = [Classifier(moe_cfg, aux), Classifier(dense_cfg, {})]
    img_size = models[0].backbone.img_size
    images = torch.randn(batch, 3, *img_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch, ), device=device)
    steps, memory, flops, costs = [], [], [], []
    for model in models:
        model.to(device).train()
        flops.append(model_flops(model, batch))
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-4,
                                  **OPTIMIZERS[optimizer])
        runner = torch.compile(model) if compile_model else model
        step = make_step(runner, adamw, images, labels, amp, device,
                         optimize)
        step()  # allocates the optimizer state
        memory.append(peak_memory_mb(step, model, device))
        steps.append(step)
        eager = make_step(model, adamw, images, labels, amp, device,
                          optimize)
        costs.append(step_cost(eager, model, optimize, record_arg=True))
    times = interleaved_times(steps, repeats, warmup)
    moe_s, dense_s = (statistics.median(t) for t in times)
    time_ratio = statistics.median(m / d for m, d in zip(*times))
    flops_ratio = flops[0] / flops[1]
    return dict(
        preset=preset,
        batch=batch,
        moe_img_s=round(batch / moe_s, 2),
        dense_img_s=round(batch / dense_s, 2),
        time_ratio=round(time_ratio, 3),
        flops_ratio=round(flops_ratio, 3),
        overhead=round(time_ratio / flops_ratio, 3),
        moe_gflops_img=round(flops[0] / 1e9, 3),
        dense_gflops_img=round(flops[1] / 1e9, 3),
        moe_mem_mb=round(memory[0], 1),
        dense_mem_mb=round(memory[1], 1),
        moe_params_m=round(sum(p.numel() for p in models[0].parameters()) /
                           1e6, 2),
        dense_params_m=round(sum(p.numel() for p in models[1].parameters()) /
                             1e6, 2),
        memory=('cuda peak allocated' if device.type == 'cuda' else
                'saved activations + weights, grads, Adam'),
        device=(torch.cuda.get_device_name(device)
                if device.type == 'cuda' else platform.processor()
                or platform.machine()),
        threads=torch.get_num_threads(),
        amp=amp,
        compile=compile_model,
        optimizer_step=optimize,
        optimizer=optimizer,
        repeats=repeats,
        moe_ms=round(moe_s * 1e3, 3),
        dense_ms=round(dense_s * 1e3, 3),
        moe_gflop=round(costs[0]['gflop'], 3),
        moe_mb=round(costs[0]['mb'], 3),
        dense_gflop=round(costs[1]['gflop'], 3),
        dense_mb=round(costs[1]['mb'], 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', nargs='+', choices=sorted(PRESETS),
                        default=['vmoe-tiny', 'vmoe-s32'])
    parser.add_argument('--batch', type=int,
                        help="images per step (default: the preset's)")
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', action='store_true',
                        help='bfloat16 autocast')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile both models')
    parser.add_argument(
        '--no-optimizer-step', action='store_true',
        help='time forward + backward only (the AdamW step costs in '
        'proportion to the parameters, not to the FLOPs)')
    parser.add_argument(
        '--optimizer', choices=sorted(OPTIMIZERS), default='fused',
        help="AdamW's implementation: fused=True (our configs') or torch's "
        'default')
    parser.add_argument('--json', help='write the rows to this JSON file')
    args = parser.parse_args()
    # Large blocks from the heap, reused step to step (moe_plugin/malloc.py).
    keep_freed_memory()
    if args.repeats < 5:
        parser.error('--repeats must be >= 5')
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for preset in args.preset:
        batch = args.batch or PRESETS[preset][2 if device.type == 'cpu' else
                                              3]
        rows.append(run_preset(preset, batch, device, args.amp,
                               args.compile, args.repeats,
                               not args.no_optimizer_step,
                               optimizer=args.optimizer))
    header = ('preset', 'batch', 'moe_img_s', 'dense_img_s', 'time_ratio',
              'flops_ratio', 'overhead', 'moe_mem_mb', 'dense_mem_mb')
    print(f'torch {torch.__version__}, {args.threads} threads, '
          f'{rows[0]["device"]}, {args.device}, amp={args.amp}, '
          f'compile={args.compile}, optimizer step='
          f'{not args.no_optimizer_step} ({args.optimizer} AdamW); memory: '
          f'{rows[0]["memory"]}')
    report(rows, header, 12, args.json)


if __name__ == '__main__':
    main()
