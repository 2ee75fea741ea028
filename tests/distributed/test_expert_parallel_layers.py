"""Expert parallelism of the MoE layers on gloo, in spawned processes.

Every process builds the one-process layer (all experts) and the
expert-parallel one from the same seed, runs the one-process layer on the
whole batch and the EP layer on its share of the images, and checks that
the EP run gives the one-process outputs, auxiliary losses, metrics and
gradients: dense gradients averaged over all ranks (as DDP does), expert
gradients summed over the ranks holding the same experts and divided by the
world size (as ``MoEDistributedDataParallel`` does).
"""
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_plugin.layers import SoftMoE, SparseMoE, SpheroMoE
from moe_plugin.layers.expert_parallel import (clip_grad_norm_,
                                               expert_parameters,
                                               resolve_expert_parallel)
from moe_plugin.models.backbones import VisionMoE

IMAGES, TOKENS, DIMS, HIDDEN = 8, 5, 16, 32

#: name -> (class, kwargs); no router noise and no dropout, so that a run
#: is a function of its weights and inputs.
CASES = {
    # capacity_factor 0.5 drops about half of the (token, choice) pairs.
    'token_choice_drops': (SparseMoE, dict(
        num_experts=8, top_k=2, capacity_factor=0.5, capacity_multiple_of=1,
        noise_std=0.0)),
    'token_choice_bpr_groups': (SparseMoE, dict(
        num_experts=8, top_k=2, capacity_factor=0.5, capacity_multiple_of=1,
        batch_priority=True, group_size=2, noise_std=0.0)),
    'expert_choice': (SparseMoE, dict(
        num_experts=8, router='expert_choice', capacity_factor=0.5,
        capacity_multiple_of=1, noise_std=0.0)),
    'soft_moe': (SoftMoE, dict(num_experts=8, slots_per_expert=2)),
    'sphero_moe': (SpheroMoE, dict(
        num_experts=4, num_universal_experts=8, noise_mult=0.0,
        expert_layer_scale=True)),
}

AUX = ('importance_loss', 'gshard_loss', 'z_loss')
CLOSE = dict(rtol=1e-4, atol=1e-6)


def _build(cls, kwargs, expert_parallel):
    torch.manual_seed(0)
    return cls(DIMS, HIDDEN, expert_parallel=expert_parallel, **kwargs)


def _loss(layer, out, target):
    """A per-token mean plus the aux losses: its mean over the ranks is the
    one-process loss."""
    loss = (out * target).sum(-1).mean()
    for key in AUX:
        if key in layer.moe_metrics:
            loss = loss + layer.moe_metrics[key]
    return loss


def _gather_images(tensor):
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _mean_over_ranks(tensor):
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size()


def _check(name, ep_size):
    cls, kwargs = CASES[name]
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = _build(cls, kwargs, False)
    layer = _build(cls, kwargs, ep_size)
    torch.manual_seed(1)
    x = torch.randn(IMAGES, TOKENS, DIMS)
    target = torch.randn(IMAGES, TOKENS, DIMS)
    share = IMAGES // world
    mine = slice(rank * share, (rank + 1) * share)

    ref_x = x.clone().requires_grad_()
    ref_out = reference(ref_x)
    _loss(reference, ref_out, target).backward()
    ep_x = x[mine].clone().requires_grad_()
    out = layer(ep_x)
    _loss(layer, out, target[mine]).backward()

    where = f'{name}, EP size {ep_size} of {world}'
    sharded = {full: (param, shard)
               for full, param, shard in expert_parameters(layer)}
    assert sharded, f'{where}: no expert was sharded'
    torch.testing.assert_close(
        _gather_images(out), ref_out, **CLOSE, msg=f'{where}: outputs')
    torch.testing.assert_close(
        _gather_images(ep_x.grad) / world, ref_x.grad, **CLOSE,
        msg=f'{where}: input gradients')
    assert set(layer.moe_metrics) == set(reference.moe_metrics), where
    for key, value in reference.moe_metrics.items():
        torch.testing.assert_close(
            _mean_over_ranks(layer.moe_metrics[key]), value.detach(),
            **CLOSE, msg=f'{where}: metric {key}')
    if isinstance(reference, SparseMoE):
        dropped = reference.moe_metrics['dropped_fraction']
        assert 0 < dropped < 1, f'{where}: no drops ({dropped})'
    ref_params = dict(reference.named_parameters())
    averaged = {}
    for key, param in layer.named_parameters():
        ref = ref_params[key]
        if key in sharded:
            _, shard = sharded[key]
            assert shard.size == (world if ep_size is True else ep_size)
            assert param.shape[0] == ref.shape[0] // shard.size, key
            grad = param.grad.clone()
            if shard.replica_group is not None:
                dist.all_reduce(grad, group=shard.replica_group)
            averaged[key] = grad / world
            grad = shard.gather(averaged[key])
            weight = shard.gather(param.detach())
        else:
            grad = averaged[key] = _mean_over_ranks(param.grad)
            weight = param.detach()
        torch.testing.assert_close(weight, ref.detach(), rtol=0, atol=0,
                                   msg=f'{where}: {key} weights')
        torch.testing.assert_close(grad, ref.grad, **CLOSE,
                                   msg=f'{where}: {key} gradient')
    # Clipping by the norm of the whole model's gradient.
    for key, param in layer.named_parameters():
        param.grad = averaged[key]
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    norm = clip_grad_norm_(layer.parameters(), 0.01)
    torch.testing.assert_close(norm, ref_norm, **CLOSE,
                               msg=f'{where}: gradient norm')
    for key, param in layer.named_parameters():
        if key in sharded:
            torch.testing.assert_close(
                sharded[key][1].gather(param.grad), ref_params[key].grad,
                **CLOSE, msg=f'{where}: {key} clipped gradient')


def _worker(rank, world, init_file, ep_sizes):
    dist.init_process_group(
        'gloo', init_method=f'file://{init_file}', rank=rank,
        world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        for ep_size in ep_sizes:
            for name in CASES:
                _check(name, ep_size)
        _check_errors(world)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _check_errors(world):
    with pytest.raises(ValueError, match=f'expert_parallel=3 does not '
                       f'divide the world size {world}'):
        resolve_expert_parallel(3)
    odd = 2 * world + 1
    with pytest.raises(ValueError, match=f'num_experts={odd} is not '
                       f'divisible by the expert-parallel size {world}'):
        SparseMoE(DIMS, HIDDEN, num_experts=odd, expert_parallel=True)
    with pytest.raises(ValueError, match='expert_parallel must be'):
        SparseMoE(DIMS, HIDDEN, expert_parallel='yes')
    layer = SparseMoE(DIMS, HIDDEN, num_experts=2 * world,
                      expert_parallel=True)
    smaller = SparseMoE(DIMS, HIDDEN, num_experts=world).state_dict()
    with pytest.raises(ValueError, match=f'with {world} experts, the model '
                       f'{2 * world} experts'):
        layer.load_state_dict(smaller)

    # The same through the backbone, whose shape check sees all experts.
    def backbone(experts, ep):
        return VisionMoE(
            arch=dict(embed_dims=DIMS, num_layers=2, num_heads=2,
                      feedforward_channels=HIDDEN), img_size=8,
            patch_size=4, moe_layers=[1],
            moe_cfg=dict(type='SparseMoE', num_experts=experts,
                         expert_parallel=ep))
    model = backbone(2 * world, True)
    other = backbone(world, False).state_dict()
    del other['layers.1.ffn.router.weight']  # checked first, and named
    with pytest.raises(ValueError, match=rf'layers.1.ffn.experts.w1: '
                       rf'checkpoint \({world}, {DIMS}, {HIDDEN}\) vs model '
                       rf'\({2 * world}, {DIMS}, {HIDDEN}\)'):
        model.load_state_dict(other)
    model.load_state_dict(backbone(2 * world, False).state_dict())
    # A full checkpoint loads as this rank's slice.
    full = SparseMoE(DIMS, HIDDEN, num_experts=2 * world)
    layer.load_state_dict(full.state_dict())
    rank = dist.get_rank()
    torch.testing.assert_close(layer.experts.w1,
                               full.experts.w1[2 * rank:2 * rank + 2])


def _spawn(world, ep_sizes, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / 'store'), ep_sizes),
             nprocs=world, join=True)


def test_two_processes_equal_one_process(tmp_path):
    _spawn(2, [2], tmp_path)


def test_four_processes_equal_one_process(tmp_path):
    # EP over all 4 ranks, and 2 EP groups of 2 (experts replicated twice).
    _spawn(4, [True, 2], tmp_path)


def test_without_process_group_nothing_changes():
    assert resolve_expert_parallel(True) is None
    for cls, kwargs in CASES.values():
        plain = _build(cls, kwargs, False)
        layer = _build(cls, kwargs, True)
        assert not expert_parameters(layer)
        x = torch.randn(2, TOKENS, DIMS)
        torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
