"""The routing options on 2 gloo processes: the auxiliary-loss-free bias is
updated from the all-reduced load (the same on every rank, the one-process
update of the whole batch), and dropless routing under expert parallelism
agrees on one capacity across the EP group (the one-process dropless
output)."""
import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_plugin.layers import SparseMoE
from moe_plugin.layers.routing import dispatcher_capacity

IMAGES, TOKENS, DIMS, HIDDEN, EXPERTS = 8, 6, 16, 32, 4


def _build(**kwargs):
    torch.manual_seed(0)
    return SparseMoE(DIMS, HIDDEN, num_experts=EXPERTS, top_k=2,
                     noise_std=0.0, **kwargs)


def _batch(rank):
    """Rank 0's images prefer expert 0, rank 1's do not: different loads."""
    torch.manual_seed(1)
    x = torch.randn(IMAGES, TOKENS, DIMS)
    favourite = _build().router.weight[0].detach()
    x[:IMAGES // 2] += 3.0 * favourite / favourite.norm()
    share = IMAGES // dist.get_world_size()
    return x, x[rank * share:(rank + 1) * share]


def _check_bias(rank):
    reference = _build(bias_balancing=True, bias_update_rate=0.01)
    layer = _build(bias_balancing=True, bias_update_rate=0.01)
    for _ in range(3):
        whole, mine = _batch(rank)
        reference(whole)
        layer(mine)
    bias = layer.router.expert_bias
    gathered = [torch.empty_like(bias) for _ in range(2)]
    dist.all_gather(gathered, bias)
    assert torch.equal(gathered[0], gathered[1]), gathered
    torch.testing.assert_close(bias, reference.router.expert_bias,
                               rtol=0, atol=0)
    assert bias.abs().sum() > 0


def _check_dropless_expert_parallel(rank):
    reference = _build(dropless=True, capacity_multiple_of=1).eval()
    layer = _build(dropless=True, capacity_multiple_of=1,
                   expert_parallel=True).eval()
    whole, mine = _batch(rank)
    seen = {}
    layer.router.register_forward_hook(
        lambda router, args, output: seen.update(
            capacity=dispatcher_capacity(output[0], args[0].shape[0])))
    out = layer(mine)
    assert layer.moe_metrics['dropped_fraction'] == 0
    # Each rank alone would need another capacity; the EP group agrees on
    # the larger (the all_to_all needs equal buffers).
    alone = _build(dropless=True, capacity_multiple_of=1).eval()
    local = {}
    alone.router.register_forward_hook(
        lambda router, args, output: local.update(
            capacity=dispatcher_capacity(output[0], args[0].shape[0])))
    alone(mine)
    capacities = [torch.zeros(2, dtype=torch.long) for _ in range(2)]
    dist.all_gather(capacities,
                    torch.tensor([seen['capacity'], local['capacity']]))
    assert capacities[0][0] == capacities[1][0]
    assert capacities[0][1] != capacities[1][1], capacities
    assert seen['capacity'] == max(int(c[1]) for c in capacities)
    share = IMAGES // dist.get_world_size()
    torch.testing.assert_close(
        out, reference(whole)[rank * share:(rank + 1) * share])


def _worker(rank, world, init_file):
    dist.init_process_group(
        'gloo', init_method=f'file://{init_file}', rank=rank,
        world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        _check_bias(rank)
        _check_dropless_expert_parallel(rank)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_bias_and_dropless_on_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / 'init')), nprocs=2)
