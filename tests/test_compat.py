"""moe_plugin.compat: scoped checkpoint allow-list and CPU distributed set-up.
"""
import io
import socket

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.logging import HistoryBuffer, MessageHub

from moe_plugin.compat import (allow_run_checkpoints,
                               mmengine_checkpoint_globals,
                               run_checkpoint_scope, setup_cpu_distributed)


def run_checkpoint_bytes():
    """A checkpoint shaped like the ones MMEngine's CheckpointHook saves."""
    hub = MessageHub.get_instance('test_compat')
    for i in range(3):
        hub.update_scalar('train/loss', 1.0 / (i + 1))
        hub.update_scalar('train/lr', 1e-3, count=2)
    hub.update_info('eta', np.float64(12.5))
    hub.update_info('iter', 3)
    checkpoint = dict(
        meta=dict(epoch=0, iter=3, seed=0, dataset_meta=dict(classes=('a', ))),
        state_dict=dict(weight=torch.arange(4.0)),
        message_hub=hub.state_dict(),
        optimizer=dict(state={}, param_groups=[dict(lr=1e-3, params=[0])]))
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def load(data):
    return torch.load(io.BytesIO(data), weights_only=True)


def test_run_checkpoint_loads_only_inside_the_scope():
    data = run_checkpoint_bytes()
    with pytest.raises(Exception, match='Weights only load failed'):
        load(data)
    with run_checkpoint_scope():
        checkpoint = load(data)
    # Scoped: the allow-list is gone again after the block.
    with pytest.raises(Exception, match='Weights only load failed'):
        load(data)

    hub = checkpoint['message_hub']
    loss = hub['log_scalars']['train/loss']
    assert isinstance(loss, HistoryBuffer)
    np.testing.assert_allclose(loss.data[0], [1.0, 0.5, 1.0 / 3])
    assert loss.mean() == pytest.approx((1.0 + 0.5 + 1.0 / 3) / 3)
    np.testing.assert_array_equal(hub['log_scalars']['train/lr'].data[1],
                                  [2, 2, 2])
    assert hub['runtime_info']['eta'] == 12.5
    torch.testing.assert_close(checkpoint['state_dict']['weight'],
                               torch.arange(4.0))


def test_allow_list_is_exactly_what_is_needed():
    data = run_checkpoint_bytes()
    needed = mmengine_checkpoint_globals()
    assert len(needed) == len(set(map(id, needed)))
    # Dropping any single entry makes the checkpoint unloadable.
    for i in range(len(needed)):
        with torch.serialization.safe_globals(needed[:i] + needed[i + 1:]):
            with pytest.raises(Exception, match='Weights only load failed'):
                load(data)


def test_plain_state_dict_loads_without_the_scope():
    buffer = io.BytesIO()
    torch.save(dict(state_dict=dict(w=torch.ones(2, 2))), buffer)
    checkpoint = load(buffer.getvalue())
    torch.testing.assert_close(checkpoint['state_dict']['w'],
                               torch.ones(2, 2))


def test_allow_run_checkpoints_patches_one_instance():
    data = run_checkpoint_bytes()

    class FakeRunner:

        def resume(self, payload):
            return load(payload)

        def load_checkpoint(self, payload):
            return load(payload)

    patched, other = FakeRunner(), FakeRunner()
    assert allow_run_checkpoints(patched) is patched
    assert patched.resume(data)['meta']['iter'] == 3
    # Only `resume` of that instance is widened.
    for call in (patched.load_checkpoint, other.resume):
        with pytest.raises(Exception, match='Weights only load failed'):
            call(data)
    allow_run_checkpoints(other, 'load_checkpoint')
    assert other.load_checkpoint(data)['meta']['epoch'] == 0
    with pytest.raises(ValueError, match='train'):
        allow_run_checkpoints(other, 'train')


@pytest.mark.parametrize('method', ['resume', 'load_checkpoint'])
@pytest.mark.parametrize('content, match', [
    (b'hello, a text file\n', 'is not a PyTorch checkpoint'),
    (bytes(range(256)) * 8, 'is not a PyTorch checkpoint'),
])
def test_runner_names_a_file_that_is_not_a_checkpoint(tmp_path, method,
                                                      content, match):
    path = tmp_path / 'bad.pth'
    path.write_bytes(content)

    class FakeRunner:
        # MMEngine's Runner.resume / load_checkpoint take the filename first.
        def resume(self, filename):
            return torch.load(filename, weights_only=True)

        load_checkpoint = resume

    runner = allow_run_checkpoints(FakeRunner(), method)
    with pytest.raises(ValueError, match=f'{path} {match}'):
        getattr(runner, method)(str(path))


@pytest.mark.parametrize('method', ['resume', 'load_checkpoint'])
def test_runner_errors_not_about_the_file_pass_through(tmp_path, method):
    path = tmp_path / 'good.pth'
    torch.save(dict(weight=torch.ones(2)), path)

    class FakeRunner:

        def resume(self, filename):
            torch.load(filename, weights_only=True)
            raise RuntimeError('size mismatch for weight')

        load_checkpoint = resume

    runner = allow_run_checkpoints(FakeRunner(), method)
    with pytest.raises(RuntimeError, match='size mismatch'):
        getattr(runner, method)(str(path))


def test_setup_cpu_distributed_does_nothing_without_launcher():
    cfg = Config(dict(launcher='none'))
    assert setup_cpu_distributed(cfg) is False
    assert 'model_wrapper_cfg' not in cfg
    assert not torch_dist.is_initialized()


def test_setup_cpu_distributed_needs_launcher_env(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match='RANK'):
        setup_cpu_distributed(Config(dict(launcher='pytorch')))
    with pytest.raises(ValueError, match='launcher'):
        setup_cpu_distributed(Config(dict(launcher='torchrun')))


@pytest.mark.parametrize('wrapper', [
    None,
    dict(type='MMDistributedDataParallel', find_unused_parameters=False),
    dict(type='MMSeparateDistributedDataParallel'),
    dict(type='MMFullyShardedDataParallel'),
])
def test_setup_cpu_distributed_starts_gloo(monkeypatch, wrapper):
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    env = dict(
        RANK='0',
        WORLD_SIZE='1',
        LOCAL_RANK='0',
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = Config(dict(launcher='pytorch'))
    if wrapper is not None:
        cfg.model_wrapper_cfg = wrapper
    try:
        assert setup_cpu_distributed(cfg) is True
        assert torch_dist.is_initialized()
        assert torch_dist.get_backend() == 'gloo'
        assert torch_dist.get_world_size() == 1
        # The Runner sees a distributed launcher and skips its own init.
        assert cfg.launcher == 'pytorch'
        # A second call finds the group and leaves everything alone.
        assert setup_cpu_distributed(cfg) is False
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    if wrapper is None:
        assert cfg.model_wrapper_cfg == dict(
            type='MMDistributedDataParallel', device_ids=None)
    elif wrapper['type'] == 'MMDistributedDataParallel':
        assert cfg.model_wrapper_cfg.device_ids is None
        assert cfg.model_wrapper_cfg.find_unused_parameters is False
    elif wrapper['type'] == 'MMSeparateDistributedDataParallel':
        # A DistributedDataParallel subclass: its DDPs get no device_ids.
        assert cfg.model_wrapper_cfg.device_ids is None
    else:
        # Not a DistributedDataParallel subclass: no device_ids to set.
        assert 'device_ids' not in cfg.model_wrapper_cfg


def test_mpi_and_slurm_variables_are_read(monkeypatch):
    from moe_plugin.compat import _launcher_env
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('SLURM_PROCID', '3')
    monkeypatch.setenv('SLURM_NTASKS', '8')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    assert _launcher_env('slurm') == dict(rank=3, world_size=8, local_rank=1)
    monkeypatch.setenv('OMPI_COMM_WORLD_RANK', '5')
    monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '6')
    monkeypatch.setenv('OMPI_COMM_WORLD_LOCAL_RANK', '2')
    assert _launcher_env('mpi') == dict(rank=5, world_size=6, local_rank=2)
    monkeypatch.delenv('MASTER_ADDR')
    with pytest.raises(RuntimeError, match='MASTER_ADDR'):
        _launcher_env('mpi')


def test_module_has_no_global_side_effect():
    # Importing compat must not widen torch.load for everybody.
    from torch.serialization import get_safe_globals
    names = {getattr(g, '__name__', str(g)) for g in get_safe_globals()}
    assert 'HistoryBuffer' not in names
