"""Run checkpoints that load with a plain ``torch.load(weights_only=True)``.

MMEngine 0.10.7 pickles the message hub into every run checkpoint: its
``HistoryBuffer`` objects (the logged losses and times) and numpy values
(the ``eta``). Since PyTorch 2.6 ``torch.load`` refuses those unless they
are allow-listed, so MMPretrain's ``ImageClassificationInferencer``,
``get_model``, ``inference_model`` and its own ``tools/test.py`` cannot read
a run checkpoint. :class:`PortableCheckpointHook` stores them as tensors,
lists and dicts when a checkpoint is written (:func:`to_portable`) and
rebuilds them when one is loaded (:func:`from_portable`), so resuming sees
exactly what MMEngine saved.

A portable value is a dict with the key :data:`TYPE_KEY`:

- ``{'__type__': 'HistoryBuffer', 'log_history': Tensor[N] (float64),
  'count_history': Tensor[N] (int64), 'max_length': int}``;
- ``{'__type__': 'numpy.ndarray', 'data': Tensor | list, 'dtype': str}``
  (a list for dtypes that torch lacks, e.g. strings).

NumPy scalars become Python numbers (``np.float64`` is a ``float``
already).
"""
from collections import OrderedDict
from typing import Any, List

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer, print_log
from mmpretrain.registry import HOOKS

#: The key that marks an encoded value.
TYPE_KEY = '__type__'
#: The types that ``torch.load(weights_only=True)`` reads without help.
PLAIN = (torch.Tensor, str, bytes, int, float, bool, complex, type(None),
         torch.dtype, torch.device, torch.Size)


def _ndarray(array: np.ndarray) -> dict:
    try:
        data = torch.from_numpy(np.ascontiguousarray(array)).clone()
    except TypeError:  # a dtype torch lacks (strings, objects)
        data = array.tolist()
    return {TYPE_KEY: 'numpy.ndarray', 'data': data, 'dtype': str(array.dtype)}


def to_portable(value: Any, unknown: List[str] = None, path: str = '') -> Any:
    """``value`` with its history buffers and numpy values made plain.

    Args:
        value: a checkpoint or any part of it.
        unknown (list, optional): collects the paths of values of other
            types (left as they are; ``weights_only`` loading refuses them).
        path (str): where ``value`` is, for ``unknown``.

    Returns:
        The converted value (containers are new, tensors shared).
    """
    if isinstance(value, PLAIN) and not isinstance(value, np.generic):
        return value
    if isinstance(value, HistoryBuffer):
        log, count = value.data
        return {
            TYPE_KEY: 'HistoryBuffer',
            'log_history': _ndarray(np.asarray(log, np.float64))['data'],
            'count_history': _ndarray(np.asarray(count, np.int64))['data'],
            'max_length': int(value.max_length)
        }
    if isinstance(value, np.ndarray):
        return _ndarray(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        items = ((k, to_portable(v, unknown, f'{path}.{k}'))
                 for k, v in value.items())
        return OrderedDict(items) if isinstance(value,
                                                OrderedDict) else dict(items)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(
            to_portable(v, unknown, f'{path}[{i}]')
            for i, v in enumerate(value))
    if unknown is not None:
        unknown.append(f'{path.lstrip(".")} ({type(value).__name__})')
    return value


def from_portable(value: Any) -> Any:
    """The inverse of :func:`to_portable` (history buffers and numpy arrays
    rebuilt; numpy scalars stay Python numbers)."""
    if isinstance(value, dict):
        kind = value.get(TYPE_KEY)
        if kind == 'HistoryBuffer':
            log, count = value['log_history'], value['count_history']
            return HistoryBuffer(
                log.numpy() if torch.is_tensor(log) else np.asarray(log),
                count.numpy() if torch.is_tensor(count) else
                np.asarray(count), value['max_length'])
        if kind == 'numpy.ndarray':
            data = value['data']
            data = data.numpy() if torch.is_tensor(data) else data
            return np.asarray(data, dtype=np.dtype(value['dtype']))
        items = ((k, from_portable(v)) for k, v in value.items())
        return OrderedDict(items) if isinstance(value,
                                                OrderedDict) else dict(items)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(from_portable(v) for v in value)
    return value


@HOOKS.register_module()
class PortableCheckpointHook(Hook):
    """Write run checkpoints that load with ``torch.load(weights_only=True)``
    and read them back for resuming.

    Before a checkpoint is written, every part of it but the weights
    (message hub, meta, the other hooks' additions) goes through
    :func:`to_portable`; a value of a type it does not know is named in one
    warning. After a checkpoint is loaded (resume, ``load_from``,
    ``tools/test.py``) :func:`from_portable` restores the message hub's
    history buffers and numpy values in place, before MMEngine reads them.
    A checkpoint written without the hook loads as before (inside
    :func:`moe_plugin.compat.run_checkpoint_scope`).

    ``configs/_base_/default_runtime.py`` has it in ``default_hooks``;
    ``tools/train.py`` adds it to a config that has not.
    """

    # Last in before_save_checkpoint, after hooks that add to the checkpoint.
    priority = 'LOWEST'

    def __init__(self):
        self._warned = False

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        unknown: List[str] = []
        for key in list(checkpoint):
            if key != 'state_dict':
                checkpoint[key] = to_portable(checkpoint[key], unknown, key)
        if unknown and not self._warned:
            self._warned = True
            print_log(
                f'PortableCheckpointHook: the checkpoint holds values that '
                f'torch.load(weights_only=True) refuses: '
                f'{", ".join(unknown[:5])}', logger='current', level=30)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in list(checkpoint):
            if key != 'state_dict':
                checkpoint[key] = from_portable(checkpoint[key])
