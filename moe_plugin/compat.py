"""Version shims for MMEngine 0.10.7 on current PyTorch, in one place.

**Resuming under ``torch.load(weights_only=True)``.** Since PyTorch 2.6,
``torch.load`` only unpickles tensors, containers and allow-listed globals.
The checkpoints that MMEngine 0.10.7's ``CheckpointHook`` writes hold, next
to the weights, the ``message_hub`` state: ``HistoryBuffer`` objects (whose
``statistics_methods`` dict is pickled as ``getattr(HistoryBuffer, 'min')``
...), numpy arrays and numpy scalars. Found by loading a real checkpoint of
``tools/train.py`` with ``weights_only=True`` and reading the errors, the
complete list is :func:`mmengine_checkpoint_globals`:

- ``mmengine.logging.HistoryBuffer``;
- ``numpy.ndarray``, ``numpy.dtype``, the ``float64`` and ``int64`` dtype
  classes, ``numpy._core.multiarray._reconstruct`` and ``.scalar`` (the
  logged values, counts and the message hub's ``eta``);
- ``getattr``. The weights-only unpickler still refuses to *call* anything
  that is not allow-listed, so ``getattr`` can only fetch attributes of
  objects that were themselves allowed; it cannot run code.

The allow-list is applied **scoped**, with
``torch.serialization.safe_globals``, never globally and never through
``weights_only=False``, and only around the loads of a run's own
checkpoints:

- ``tools/train.py --resume`` wraps ``runner.resume`` (see
  :func:`allow_run_checkpoints`); ``load_from`` (pretrained or converted
  weights) is loaded by ``runner.load_checkpoint`` outside the scope, that is
  with plain ``weights_only=True``.
- ``tools/test.py CONFIG CHECKPOINT`` wraps ``runner.load_checkpoint``: its
  checkpoint is usually one written by ``tools/train.py`` (with message hub
  and meta). The same scoped list is used because those are the project's
  own run checkpoints, and a plain state dict (converted or generated
  weights) loads inside the scope exactly as it would outside: the list only
  admits the inert types above.

**Distributed runs without CUDA.** MMEngine's launchers call
``torch.cuda.set_device`` and use NCCL, so ``--launcher pytorch`` fails on a
CPU-only machine. :func:`setup_cpu_distributed` starts a gloo process group
from the launcher's environment before the ``Runner`` is built (MMEngine
then skips its own ``init_dist`` because ``is_distributed()`` is true) and
makes the DDP wrapper use no ``device_ids``.
"""
import functools
import os
from contextlib import contextmanager
from typing import Iterator, List

import numpy as np
import torch
import torch.distributed as torch_dist

__all__ = [
    'mmengine_checkpoint_globals', 'run_checkpoint_scope',
    'allow_run_checkpoints', 'setup_cpu_distributed'
]


def mmengine_checkpoint_globals() -> List[object]:
    """Globals that an MMEngine 0.10.7 run checkpoint needs to unpickle.

    Returns:
        list: The objects to pass to ``torch.serialization.safe_globals``.
    """
    from mmengine.logging import HistoryBuffer
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    return [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.float64)),
        type(np.dtype(np.int64)),
        _reconstruct,
        scalar,
        getattr,
    ]


@contextmanager
def run_checkpoint_scope() -> Iterator[None]:
    """Allow-list :func:`mmengine_checkpoint_globals` inside the block.

    On PyTorch without ``safe_globals`` (< 2.5, where ``torch.load`` does
    not default to ``weights_only=True``) this does nothing.
    """
    safe_globals = getattr(torch.serialization, 'safe_globals', None)
    if safe_globals is None:
        yield
        return
    with safe_globals(mmengine_checkpoint_globals()):
        yield


def allow_run_checkpoints(runner, method: str = 'resume'):
    """Run ``runner.<method>`` inside :func:`run_checkpoint_scope`.

    The bound method is replaced on this runner instance only, so
    ``Runner.load_or_resume`` (which calls ``self.resume`` or
    ``self.load_checkpoint``) loads inside the scope and nothing else does.
    A local file that is not a checkpoint (text, random bytes, a pickle of
    other objects) fails with one clear error naming it
    (:func:`moe_plugin.fileio.checkpoint_error`).

    Args:
        runner (mmengine.runner.Runner): The runner to patch.
        method (str): ``'resume'`` (training) or ``'load_checkpoint'``
            (testing a run's checkpoint). Defaults to ``'resume'``.

    Returns:
        mmengine.runner.Runner: ``runner``.
    """
    if method not in ('resume', 'load_checkpoint'):
        raise ValueError(f'method must be "resume" or "load_checkpoint", '
                         f'got {method!r}')
    original = getattr(runner, method)

    @functools.wraps(original)
    def scoped(*args, **kwargs):
        from .fileio import checkpoint_error
        filename = args[0] if args else kwargs.get('filename')
        try:
            with run_checkpoint_scope():
                return original(*args, **kwargs)
        except Exception as error:
            clear = (checkpoint_error(filename, error)
                     if isinstance(filename, str) else None)
            if clear is None:
                raise
            raise clear from error

    setattr(runner, method, scoped)
    return runner


def _launcher_env(launcher: str) -> dict:
    """Rank, world size and local rank from the launcher's variables."""
    env = os.environ
    if launcher == 'pytorch':
        keys = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')
    elif launcher == 'slurm':
        keys = ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID')
    elif launcher == 'mpi':
        keys = ('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE',
                'OMPI_COMM_WORLD_LOCAL_RANK')
    else:
        raise ValueError(f'launcher must be one of "pytorch", "slurm", '
                         f'"mpi", got {launcher!r}')
    missing = [k for k in keys if k not in env]
    if missing:
        raise RuntimeError(f'--launcher {launcher} needs the environment '
                           f'variables {missing}; start the job with its '
                           f'launcher (e.g. tools/dist_train.sh)')
    if 'MASTER_ADDR' not in env:
        raise RuntimeError(f'--launcher {launcher} on CPU needs MASTER_ADDR '
                           f'(and MASTER_PORT) in the environment')
    return dict(
        rank=int(env[keys[0]]),
        world_size=int(env[keys[1]]),
        local_rank=int(env[keys[2]]))


def setup_cpu_distributed(cfg) -> bool:
    """Start a gloo process group when a distributed run has no CUDA.

    Does nothing (and returns False) for ``cfg.launcher == 'none'``, when
    CUDA is available (MMEngine's own NCCL set-up is used) or when a process
    group already exists. Otherwise it initialises ``torch.distributed``
    with the gloo backend from the launcher's environment (``env://``),
    exports ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and sets
    ``cfg.model_wrapper_cfg`` so that DDP gets ``device_ids=None``.
    ``cfg.launcher`` stays as it is, so the ``Runner`` knows it is
    distributed and skips its own initialisation.

    Args:
        cfg (mmengine.Config): The run's config, with ``launcher`` set.

    Returns:
        bool: Whether a gloo process group was started.
    """
    launcher = cfg.get('launcher', 'none')
    if (launcher == 'none' or torch.cuda.is_available()
            or torch_dist.is_initialized()):
        return False
    info = _launcher_env(launcher)
    os.environ['RANK'] = str(info['rank'])
    os.environ['WORLD_SIZE'] = str(info['world_size'])
    os.environ['LOCAL_RANK'] = str(info['local_rank'])
    os.environ.setdefault('MASTER_PORT', '29500')
    timeout = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('timeout')
    kwargs = {}
    if timeout is not None:
        import datetime
        kwargs['timeout'] = datetime.timedelta(seconds=timeout)
    torch_dist.init_process_group(
        backend='gloo',
        init_method='env://',
        rank=info['rank'],
        world_size=info['world_size'],
        **kwargs)

    import mmengine.model  # noqa: F401  (registers the model wrappers)
    from mmengine.registry import MODEL_WRAPPERS
    from torch.nn.parallel import DistributedDataParallel
    wrapper_cfg = cfg.get('model_wrapper_cfg', None)
    if wrapper_cfg is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None)
    else:
        wrapper_type = MODEL_WRAPPERS.get(
            wrapper_cfg.get('type', 'MMDistributedDataParallel'))
        if isinstance(wrapper_type, type) and issubclass(
                wrapper_type, DistributedDataParallel):
            wrapper_cfg['device_ids'] = None
    return True


def teardown_distributed() -> None:
    """Wait for every rank, then destroy the process group, so that no
    rank exits while gloo's threads still serve another (which aborts it
    with "terminate called without an active exception")."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
