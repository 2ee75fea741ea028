"""Whether a ``CheckpointHook`` is about to write a checkpoint.

Hooks that must prepare a checkpoint with a collective over every rank
(``RandomStateHook`` gathers the random states, ``ExpertParallelHook`` the
experts) do it in ``after_train_iter`` / ``after_train_epoch`` before the
``CheckpointHook`` (priority ``VERY_LOW``) saves on rank 0 alone, and ask
this module whether it will.
"""
from typing import List

from mmengine.hooks import CheckpointHook


def checkpoint_hooks(runner) -> List[CheckpointHook]:
    """The runner's ``CheckpointHook`` instances."""
    return [h for h in runner.hooks if isinstance(h, CheckpointHook)]


def checkpoint_due_after_iter(runner) -> bool:
    """Whether a checkpoint hook saves after this training iteration
    (iteration-based: every ``interval`` from ``save_begin``, or the last
    iteration with ``save_last``)."""
    return any(not hook.by_epoch and (
        hook.every_n_train_iters(runner, hook.interval, hook.save_begin) or
        (hook.save_last and hook.is_last_train_iter(runner)))
               for hook in checkpoint_hooks(runner))


def checkpoint_due_after_epoch(runner) -> bool:
    """Whether a checkpoint hook saves after this training epoch
    (epoch-based: every ``interval`` from ``save_begin``, or the last epoch
    with ``save_last``)."""
    return any(hook.by_epoch and (
        hook.every_n_epochs(runner, hook.interval, hook.save_begin) or
        (hook.save_last and hook.is_last_train_epoch(runner)))
               for hook in checkpoint_hooks(runner))


def best_checkpoint_possible(runner) -> bool:
    """Whether a checkpoint hook may save a best checkpoint after this
    validation (``save_best`` set)."""
    return any(hook.save_best for hook in checkpoint_hooks(runner))
