"""Expert parallelism against replicated experts: tokens/s and memory per
rank of a V-MoE layer's training step, over 1, 2 and 4 processes.

Each of ``W`` processes (gloo on a CPU, NCCL with ``--device cuda``, one
GPU per process) runs a ``SparseMoE`` layer (E = 8, K = 2, c = 1.05,
D = 384, H = 1536, one routing group of 8 images x 50 tokens per rank: V-MoE
S/32's MoE layer at 400 tokens per rank) through its training step:
forward, backward, gradient synchronisation and an AdamW step.

- ``replicated``: every rank holds every expert, wrapped in MMEngine's DDP
  (all gradients all-reduced): what plain data parallelism does today.
- ``ep``: ``expert_parallel=True``, each rank holds ``E / W`` experts, the
  buffer goes through ``all_to_all`` twice forward and twice backward,
  wrapped in ``MoEDistributedDataParallel``.

Per rank: tokens/s (median over ``--repeats`` after a warm-up), the bytes
of the layer's weights, gradients and Adam moments (``state_mb``, from the
tensors a rank holds), the bytes saved for the backward (``act_mb``, the
weights left out), and the bytes each rank sends to the others in the
exchanges of one step (``a2a_mb``, counted at ``dist.all_to_all_single``).
``tools/analysis/ep_scaling.py --check`` compares its analytic model with
these.

Usage::

    python benchmarks/expert_parallel.py [--world 1 2 4] [--repeats 5] \
        [--experts 8] [--device cuda] [--json out.json]
"""
import argparse
import contextlib
import datetime
import os
import os.path as osp
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from memory import saved_bytes  # noqa: E402
from report import report  # noqa: E402

DIMS, HIDDEN, TOP_K, FACTOR = 384, 1536, 2, 1.05
IMAGES, TOKENS = 8, 50


def _count_all_to_all(world):
    """Count the bytes this rank sends to others through
    ``dist.all_to_all_single`` until the returned list is popped."""
    original = dist.all_to_all_single
    sent = [0.0]

    def counting(output, input, *args, **kwargs):
        sent[0] += input.numel() * input.element_size() * (world - 1) / world
        return original(output, input, *args, **kwargs)

    class Counter(list):
        def pop(self):
            dist.all_to_all_single = original
            return sent[0]

    dist.all_to_all_single = counting
    return Counter()


def _measure(mode, experts, device, repeats, warmup=2):
    from mmengine.model import MMDistributedDataParallel

    from moe_plugin.engine import MoEDistributedDataParallel
    from moe_plugin.layers import SparseMoE
    from moe_plugin.layers.expert_parallel import expert_parameters
    world = dist.get_world_size()
    torch.manual_seed(0)
    layer = SparseMoE(
        DIMS, HIDDEN, num_experts=experts, top_k=TOP_K,
        capacity_factor=FACTOR, group_size=IMAGES,
        expert_parallel=(mode == 'ep')).to(device).train()
    shape = {}

    def record_buffer(module, args):
        shape.setdefault('buffer', tuple(args[0].shape))

    layer.experts.register_forward_pre_hook(record_buffer)
    if world > 1:
        wrapper = (MoEDistributedDataParallel
                   if mode == 'ep' else MMDistributedDataParallel)
        model = wrapper(
            module=layer,
            device_ids=None if device.type == 'cpu' else [device.index])
    else:
        model = layer
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    # As inside a model: the input needs its gradient (4 exchanges).
    x = torch.randn(IMAGES, TOKENS, DIMS, device=device, requires_grad=True)
    target = torch.randn_like(x)

    def step(record=None):
        optimizer.zero_grad(set_to_none=True)
        with (contextlib.nullcontext()
              if record is None else saved_bytes(record, layer)):
            out = model(x)
        loss = (out * target).mean() + layer.moe_metrics['importance_loss']
        loss.backward()
        optimizer.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()

    step()
    activations = []
    sent = _count_all_to_all(world)
    step(activations)
    a2a = sent.pop()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    state = 4 * sum(p.numel() * p.element_size() for p in layer.parameters())
    expert_state = 4 * sum(p.numel() * p.element_size()
                           for p in layer.experts.parameters())
    sharded = bool(expert_parameters(layer))
    buffer = shape['buffer']  # [E, C, D], all experts, this rank's slots
    grad_sync = (0 if world == 1 else
                 state // 4 - (expert_state // 4 if sharded else 0))
    return dict(
        mode=mode,
        world=world,
        experts=experts,
        local_experts=layer.experts.num_experts,
        tokens_per_rank=IMAGES * TOKENS,
        step_ms=round(seconds * 1e3, 2),
        tokens_s_rank=round(IMAGES * TOKENS / seconds, 1),
        tokens_s_total=round(world * IMAGES * TOKENS / seconds, 1),
        state_mb=round(state / 2**20, 2),
        expert_state_mb=round(expert_state / 2**20, 2),
        act_mb=round(activations[0] / 2**20, 2),
        a2a_mb=round(a2a / 2**20, 3),
        allreduce_mb=round(grad_sync / 2**20, 3),
        buffer=list(buffer),
        device=device.type)


def _worker(rank, world, init_file, experts, device_type, repeats, queue):
    backend = 'nccl' if device_type == 'cuda' else 'gloo'
    if device_type == 'cuda':
        torch.cuda.set_device(rank)
        device = torch.device('cuda', rank)
    else:
        device = torch.device('cpu')
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        backend, init_method=f'file://{init_file}', rank=rank,
        world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        modes = ('replicated', 'ep') if world > 1 else ('replicated', )
        rows = [_measure(mode, experts, device, repeats) for mode in modes]
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            # Rank 0's row, with the slowest rank's time.
            for i, row in enumerate(rows):
                slowest = max(r[i]['step_ms'] for r in gathered)
                row['step_ms_slowest_rank'] = slowest
            queue.put(rows)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run(world, experts, device_type, repeats):
    context = mp.get_context('spawn')
    queue = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker,
            args=(world, osp.join(tmp, 'store'), experts, device_type,
                  repeats, queue),
            nprocs=world,
            join=True,
            start_method='spawn')
        return queue.get()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--world', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--experts', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--json', help='write the rows to this JSON file')
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error('--repeats must be >= 5')
    for world in args.world:
        if args.experts % world:
            parser.error(f'--experts {args.experts} is not divisible by '
                         f'--world {world}')
    rows = []
    for world in args.world:
        rows += run(world, args.experts, args.device, args.repeats)
    header = ('mode', 'world', 'local_experts', 'step_ms', 'tokens_s_rank',
              'tokens_s_total', 'state_mb', 'act_mb', 'a2a_mb',
              'allreduce_mb')
    print(f'torch {torch.__version__}, {args.device}, {os.cpu_count()} '
          f'cores, E={args.experts}, D={DIMS}, H={HIDDEN}, '
          f'{IMAGES * TOKENS} tokens per rank')
    report(rows, header, 14, args.json)


if __name__ == '__main__':
    main()
