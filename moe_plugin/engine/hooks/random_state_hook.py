"""Save the random number generators with each checkpoint and restore them
on resume, so that a resumed run draws the same router noise, dropout and
augmentation as an uninterrupted one.

MMEngine 0.10 saves the seed but not the generators' states: a resumed run
starts its random streams from the seed again (or from wherever model
building left them), so every random draw after the resume differs.
"""
import random
from typing import Dict, List, Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.runner import IterBasedTrainLoop
from mmpretrain.registry import HOOKS

from .checkpoint_due import (checkpoint_due_after_epoch,
                             checkpoint_due_after_iter)

#: The checkpoint key holding one state dict per rank.
CHECKPOINT_KEY = 'rng_states'


def capture_random_states() -> Dict:
    """The states of Python's, NumPy's and PyTorch's (CPU, CUDA) generators.

    Only tensors, ints, floats, strings, tuples and lists: the checkpoint
    loads with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = dict(
        python=random.getstate(),
        numpy=(kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
               int(has_gauss), float(gauss)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: Dict) -> None:
    """Set the generators to ``states`` from :func:`capture_random_states`."""
    version, internal, gauss_next = states['python']
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = states['numpy']
    np.random.set_state(
        (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


class _SkipWithoutRandomness:
    """Wraps the train loop's data iterator so that the batches MMEngine
    skips on resume are fetched without touching the restored generators;
    after them the loop gets its own iterator back."""

    def __init__(self, loop: IterBasedTrainLoop, skips: int):
        self.loop = loop
        self.iterator = loop.dataloader_iterator
        self.skips = skips

    def __iter__(self):
        return self

    def __next__(self):
        if self.skips == 0:
            self.loop.dataloader_iterator = self.iterator
            return next(self.iterator)
        self.skips -= 1
        states = capture_random_states()
        try:
            return next(self.iterator)
        finally:
            restore_random_states(states)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Make an interrupted and resumed run draw the same random numbers as an
    uninterrupted one.

    - Every checkpoint that :class:`~mmengine.hooks.CheckpointHook` writes
      holds, under ``rng_states``, the generator states of every rank
      (Python, NumPy, PyTorch CPU and CUDA) at the moment it was written;
      under DDP they are gathered from all ranks at those iterations.
    - On resume (not on ``load_from``) each rank gets its own states back
      just before training continues. The batches that the iteration-based
      loop skips to reach the resumed position are fetched without
      consuming random numbers.
    - Validation runs between its own saved and restored states, so that
      evaluating (or not) never shifts the training's random streams.

    With ``num_workers > 0`` the augmentations run in the workers, which
    MMEngine seeds from the run's seed, the rank and the worker index; a
    resumed run replays them identically. A checkpoint written on another
    number of ranks resumes with a warning and MMEngine's re-seeded streams.
    """

    # Before CheckpointHook (VERY_LOW) in after_train_iter/epoch.
    priority = 'LOW'

    def __init__(self):
        self._gathered: Optional[List[Dict]] = None
        self._gathered_at = None
        self._pending: Optional[Dict] = None
        self._val_states: Optional[Dict] = None

    # -- saving ------------------------------------------------------------
    def _gather(self, runner) -> None:
        """Collect every rank's states where a checkpoint is about to be
        written (all ranks take part in the collective)."""
        if get_world_size() == 1:
            return
        self._gathered = all_gather_object(capture_random_states())
        self._gathered_at = runner.iter

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        if checkpoint_due_after_iter(runner):
            self._gather(runner)

    def after_train_epoch(self, runner) -> None:
        if checkpoint_due_after_epoch(runner):
            self._gather(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # Called on rank 0 only, at the iteration of the gathering (or, for
        # a checkpoint saved elsewhere, e.g. the best one, not at all).
        if get_world_size() == 1:
            checkpoint[CHECKPOINT_KEY] = [capture_random_states()]
        elif self._gathered is not None and self._gathered_at == runner.iter:
            checkpoint[CHECKPOINT_KEY] = self._gathered

    # -- restoring ---------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False):
            return  # load_from: new random streams, as MMEngine does.
        states = checkpoint.get(CHECKPOINT_KEY)
        if states is None:
            runner.logger.warning(
                'The resumed checkpoint holds no random states (written '
                'without RandomStateHook): random draws after the resume '
                'differ from an uninterrupted run')
        elif len(states) != get_world_size():
            runner.logger.warning(
                f'The resumed checkpoint holds random states of '
                f'{len(states)} ranks, this run has {get_world_size()}: '
                'they are not restored')
        else:
            self._pending = states[get_rank()]

    def before_train_epoch(self, runner) -> None:
        if self._pending is None:
            return
        restore_random_states(self._pending)
        self._pending = None
        loop = runner.train_loop
        if isinstance(loop, IterBasedTrainLoop) and loop.iter > 0:
            loop.dataloader_iterator = _SkipWithoutRandomness(loop, loop.iter)

    # -- validation --------------------------------------------------------
    def before_val(self, runner) -> None:
        self._val_states = capture_random_states()

    def after_val(self, runner) -> None:
        if self._val_states is not None:
            restore_random_states(self._val_states)
            self._val_states = None
