"""The runner set-up that ``tools/train.py`` and ``tools/test.py`` share.

MMPretrain's two scripts differ from each other only in their arguments;
what this plugin adds on top lives here once:

- :func:`default_work_dir` and :func:`set_default_dataloader_cfg`
  (MMPretrain's defaults);
- :func:`fix_persistent_workers`: the DataLoader refuses
  ``persistent_workers`` without workers;
- :func:`fall_back_from_amp`: ``AmpOptimWrapper`` asserts a GPU; on a CPU
  the run uses a plain ``OptimWrapper`` (one warning line);
- :func:`ensure_portable_checkpoints`: run checkpoints that load with plain
  ``torch.load(weights_only=True)``
  (:class:`~moe_plugin.engine.hooks.PortableCheckpointHook`);
- :func:`build_runner`: expert parallelism's wrapper and hook, gloo on a
  CPU-only machine, then the runner, whose checkpoint loading (``resume``
  and ``load_checkpoint``) also reads checkpoints written before the
  portable format (scoped allow-list of :mod:`moe_plugin.compat`).
"""
import os.path as osp
from typing import Optional

from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

#: The dataloaders of a run config.
DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
#: The hook type :func:`ensure_portable_checkpoints` adds.
PORTABLE_HOOK = 'PortableCheckpointHook'
#: ``AmpOptimWrapper`` arguments that ``OptimWrapper`` does not take.
AMP_ONLY_KEYS = ('loss_scale', 'dtype', 'use_fsdp')


def default_work_dir(cfg: Config, config_path: str,
                     work_dir: Optional[str] = None) -> str:
    """``cfg.work_dir``: the command line's, else the config's, else
    ``./work_dirs/<config name>``."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config_path))[0])
    return cfg.work_dir


def set_default_dataloader_cfg(cfg: Config,
                               field: str,
                               pin_memory: bool = True,
                               persistent_workers: Optional[bool] = True):
    """Fill in MMPretrain's dataloader defaults under ``cfg[field]``; the
    config's own values win. ``pin_memory`` is only turned on with CUDA;
    ``persistent_workers=None`` leaves it out."""
    if cfg.get(field, None) is None:
        return
    import torch
    defaults = ConfigDict(
        pin_memory=pin_memory and torch.cuda.is_available(),
        collate_fn=dict(type='default_collate'))
    if persistent_workers is not None:
        defaults.persistent_workers = persistent_workers
    defaults.update(cfg[field])
    cfg[field] = defaults


def fix_persistent_workers(cfg: Config) -> None:
    """``persistent_workers=False`` where a dataloader has no workers (the
    DataLoader raises ``ValueError`` otherwise)."""
    for field in DATALOADERS:
        loader = cfg.get(field, None)
        if loader and not loader.get('num_workers', 0):
            loader['persistent_workers'] = False


def fall_back_from_amp(cfg: Config, cuda: Optional[bool] = None) -> bool:
    """Without a GPU, train an ``AmpOptimWrapper`` config with a plain
    ``OptimWrapper`` in float32 (MMEngine's AMP wrapper asserts CUDA, NPU,
    MLU or MUSA), with one warning line.

    Args:
        cfg (Config): the run config (``optim_wrapper`` changed in place).
        cuda (bool, optional): whether CUDA is available. Defaults to None
            (asked from torch).

    Returns:
        bool: whether the config was changed.
    """
    wrapper = cfg.get('optim_wrapper', None)
    if not isinstance(wrapper, dict) or wrapper.get('type') not in (
            'AmpOptimWrapper', 'mmengine.AmpOptimWrapper'):
        return False
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    if cuda:
        return False
    wrapper['type'] = 'OptimWrapper'
    for key in AMP_ONLY_KEYS:
        wrapper.pop(key, None)
    print_log(
        'No GPU: AmpOptimWrapper replaced by OptimWrapper (float32 '
        'training; mixed precision needs CUDA)',
        logger='current',
        level=30)
    return True


def ensure_portable_checkpoints(cfg: Config) -> bool:
    """Add :data:`PORTABLE_HOOK` to ``custom_hooks`` unless the config has
    it (in ``default_hooks`` or ``custom_hooks``).

    Returns:
        bool: whether it was added.
    """
    default_hooks = cfg.get('default_hooks', None) or {}
    custom_hooks = list(cfg.get('custom_hooks', None) or [])
    present = [h for h in list(default_hooks.values()) + custom_hooks
               if isinstance(h, dict) and h.get('type') == PORTABLE_HOOK]
    if present:
        return False
    custom_hooks.append(dict(type=PORTABLE_HOOK))
    cfg.custom_hooks = custom_hooks
    return True


def build_runner(cfg: Config):
    """Build the runner of ``cfg`` the way both tools do.

    Expert parallelism gets its wrapper and hook
    (:func:`~moe_plugin.engine.configure_expert_parallel`), a distributed
    run on a CPU-only machine its gloo group, ``AmpOptimWrapper`` a CPU
    fallback and dataloaders without workers no persistent workers; the
    runner's ``resume`` and ``load_checkpoint`` (``--resume``, ``load_from``,
    ``tools/test.py``'s checkpoint) also read run checkpoints written before
    the portable format, and name a file that is no checkpoint in one clear
    error.

    Args:
        cfg (Config): the merged run config.

    Returns:
        mmengine.runner.Runner: the runner.
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    import moe_plugin  # noqa: F401  (registers the plugin's modules)
    from moe_plugin.compat import allow_run_checkpoints, setup_cpu_distributed

    from .model_wrapper import configure_expert_parallel

    fix_persistent_workers(cfg)
    fall_back_from_amp(cfg)
    configure_expert_parallel(cfg)
    setup_cpu_distributed(cfg)
    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    for method in ('resume', 'load_checkpoint'):
        allow_run_checkpoints(runner, method)
    return runner
