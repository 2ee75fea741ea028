"""Analytic per-GPU memory and communication of V-MoE training, with and
without expert parallelism (the model behind ``docs/scaling.md``).

The model is built from one of our configs on the ``meta`` device (no
memory, no weights), with the architecture, patch size and expert count
given here, so that the parameter counts, the MoE blocks, the routing
(K, capacity factor, group size) and the buffer size ``C`` are the code's
own. Per GPU, for a per-GPU batch of ``b`` images:

- ``state``: weights, gradients and two Adam moments in float32 (16 bytes
  per parameter), dense parameters on every GPU; expert parameters on every
  GPU (replicated) or ``1 / P`` of them (EP over ``P = min(E, W)`` ranks,
  ``W / P`` replicas of each expert).
- ``act``: activations saved for the backward in bfloat16, per block
  ``N * b * D * (34 + 5 * heads * N / D)`` bytes (Korthikanti et al. 2022,
  no recomputation), where an MoE block's MLP term (``19 * D`` of the 34)
  is replaced by its buffer rows ``E * C`` times ``2 * D + 4 * H`` bytes.
  The same with and without EP (a rank receives as many slots as it sends).
- ``a2a``: bytes a GPU sends in the all-to-alls of one step, 4 exchanges
  (2 forward, 2 backward) of ``(P - 1) / P`` of its ``[E, C, D]`` buffer in
  bfloat16, summed over the MoE blocks.
- ``allreduce``: bytes a GPU sends in ring all-reduces of the float32
  gradients, ``2 (n - 1) / n`` of them over ``n`` ranks: all gradients
  over ``W`` (replicated); dense ones over ``W`` and expert ones over the
  ``W / P`` replicas (EP).

``--check FILE`` compares the formulas for ``state`` and ``a2a`` with what
``benchmarks/expert_parallel.py --json FILE`` measured.

Usage::

    python tools/analysis/ep_scaling.py [--batch-per-gpu 32] \
        [--gpus 8 32 128 512] [--experts 8 32] [--check ep.json] \
        [--markdown]
"""
import argparse
import json
import os.path as osp
import sys

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import HelpFormatter, add_debug_arg, run_main  # noqa: E402

#: name -> (arch, patch size)
MODELS = {'B/16': ('vmoe-b', 16), 'L/16': ('vmoe-l', 16),
          'H/14': ('vmoe-h', 14)}
DEFAULT_CONFIG = osp.join(REPO_ROOT, 'configs', '_base_', 'models',
                          'vmoe-b16-every2.py')
GB = 1e9


def build_meta_backbone(config: str, arch: str, patch: int, experts: int):
    """The config's backbone with another size, on the meta device."""
    import torch
    from mmengine.config import Config
    from mmpretrain.registry import MODELS as REGISTRY

    import moe_plugin  # noqa: F401
    backbone = Config.fromfile(config).model.backbone.to_dict()
    backbone.update(arch=arch, patch_size=patch)
    backbone['moe_cfg'] = dict(backbone['moe_cfg'], num_experts=experts)
    with torch.device('meta'):
        return REGISTRY.build(backbone)


def layer_state_bytes(dims, hidden, experts, ep_size):
    """float32 weights, grads, 2 Adam moments of one SparseMoE layer on one
    rank: router ``E x D`` plus ``E / P`` experts."""
    per_expert = 2 * dims * hidden + hidden + dims
    return 16 * (experts * dims + experts // ep_size * per_expert)


def a2a_bytes(experts, slots, dims, ep_size, element=2):
    """Bytes one rank sends in a step's 4 exchanges of ``[E, C, D]``."""
    return 4 * (ep_size - 1) / ep_size * experts * slots * dims * element


def ring_bytes(numel_bytes, ranks):
    return 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * numel_bytes


def analyse(backbone, batch, gpus):
    """Rows for one model at every world size in ``gpus``."""
    from moe_plugin.layers import SparseMoE
    dims = backbone.embed_dims
    tokens = (backbone.patch_resolution[0] * backbone.patch_resolution[1] +
              backbone.num_extra_tokens)
    heads = backbone.layers[0].attn.num_heads
    moe = [m for m in backbone.modules() if isinstance(m, SparseMoE)]
    experts = moe[0].num_experts
    expert_params = sum(p.numel() for n, p in backbone.named_parameters()
                        if '.experts.' in n)
    dense_params = sum(
        p.numel() for p in backbone.parameters()) - expert_params
    hidden = moe[0].experts.w1.shape[-1]
    group = moe[0].group_size or 1
    capacity = moe[0].capacity_for(group * tokens)
    if capacity is None:
        raise SystemExit(
            'ep_scaling models a fixed capacity, but moe_cfg has '
            'dropless=True (the capacity follows each batch); estimate '
            'with dropless=False and a capacity_factor instead')
    slots = (batch // group) * capacity  # C of the buffer
    block = tokens * batch * dims * (34 + 5 * heads * tokens / dims)
    mlp = tokens * batch * 19 * dims
    moe_mlp = experts * slots * (2 * dims + 4 * hidden)
    act = len(backbone.layers) * block + len(moe) * (moe_mlp - mlp)
    rows = []
    for world in gpus:
        ep_size = min(experts, world)
        if world % ep_size or experts % ep_size:
            continue
        replicas = world // ep_size
        rows.append(dict(
            experts=experts,
            gpus=world,
            ep_size=ep_size,
            params_b=round((dense_params + expert_params) / 1e9, 2),
            state_gb_replicated=round(
                16 * (dense_params + expert_params) / GB, 1),
            state_gb_ep=round(
                16 * (dense_params + expert_params / ep_size) / GB, 2),
            act_gb=round(act / GB, 1),
            a2a_gb_ep=round(len(moe) * a2a_bytes(
                experts, slots, dims, ep_size) / GB, 2),
            allreduce_gb_replicated=round(ring_bytes(
                4 * (dense_params + expert_params), world) / GB, 2),
            allreduce_gb_ep=round((ring_bytes(4 * dense_params, world) +
                                   ring_bytes(4 * expert_params / ep_size,
                                              replicas)) / GB, 2)))
    return rows


def check(path):
    """Formulas against ``benchmarks/expert_parallel.py``'s measurements."""
    from benchmarks.expert_parallel import (DIMS, FACTOR, HIDDEN, IMAGES,
                                            TOKENS, TOP_K)
    from moe_plugin.layers.routing import compute_capacity
    with open(path) as f:
        measured = json.load(f)
    out = []
    for row in measured:
        ep_size = row['world'] if row['mode'] == 'ep' else 1
        experts = row['experts']
        # One routing group of all the rank's images.
        slots = compute_capacity(IMAGES * TOKENS, experts, TOP_K, FACTOR)
        state = layer_state_bytes(DIMS, HIDDEN, experts, ep_size)
        a2a = a2a_bytes(experts, slots, DIMS, ep_size, element=4)
        out.append(dict(
            mode=row['mode'], world=row['world'],
            state_mb_model=round(state / 2**20, 2),
            state_mb_measured=row['state_mb'],
            a2a_mb_model=round(a2a / 2**20, 3),
            a2a_mb_measured=row['a2a_mb']))
    return out


def print_table(rows, markdown):
    header = list(rows[0])
    if markdown:
        print('| ' + ' | '.join(header) + ' |')
        print('|' + '---|' * len(header))
        for row in rows:
            print('| ' + ' | '.join(str(row[h]) for h in header) + ' |')
    else:
        print(' '.join(f'{h:>14}' for h in header))
        for row in rows:
            print(' '.join(f'{row[h]!s:>14}' for h in header))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=HelpFormatter)
    parser.add_argument('--config', default=DEFAULT_CONFIG,
                        help='model config giving the layout and routing')
    parser.add_argument('--models', nargs='+', default=list(MODELS),
                        choices=list(MODELS))
    parser.add_argument('--experts', type=int, nargs='+', default=[8, 32])
    parser.add_argument('--gpus', type=int, nargs='+',
                        default=[8, 16, 32, 64, 128, 256, 512])
    parser.add_argument('--batch-per-gpu', type=int, default=32)
    parser.add_argument('--check', help='JSON of benchmarks/expert_parallel')
    parser.add_argument('--markdown', action='store_true')
    parser.add_argument('--json', help='write the rows to this JSON file')
    add_debug_arg(parser)
    args = parser.parse_args()
    all_rows = []
    for name in args.models:
        arch, patch = MODELS[name]
        for experts in args.experts:
            backbone = build_meta_backbone(args.config, arch, patch, experts)
            rows = analyse(backbone, args.batch_per_gpu, args.gpus)
            all_rows += [dict(model=name, **row) for row in rows]
    print(f'{args.batch_per_gpu} images per GPU; config '
          f'{osp.relpath(args.config, REPO_ROOT)}')
    print_table(all_rows, args.markdown)
    if args.check:
        print()
        print_table(check(args.check), args.markdown)
    if args.json:
        from moe_plugin.analysis.outputs import write_json
        write_json(args.json, all_rows)


if __name__ == '__main__':
    run_main(main)
