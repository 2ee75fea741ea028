"""Output files written whole or not at all.

Every tool of the plugin that writes (recycled weights and their report,
converted checkpoints and configs, analysis tables and figures) writes each
file to a temporary name in its own folder and renames it when complete, so
an interrupted or failing run leaves neither a partial file nor a damaged
earlier output; an existing output is only replaced when asked (``force``).
Outputs get the mode a plain ``open()`` gives (``0666`` less the umask,
usually ``0644``), not the temporary file's ``0600``.
:func:`load_torch_file` reads a checkpoint with one clear error.
"""
import os
import os.path as osp
import pickle
import tempfile
import zipfile
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence


def check_outputs(paths: Sequence[Optional[str]], force: bool = False) -> None:
    """Raise ``FileExistsError`` naming the first existing output, unless
    ``force`` (None entries are skipped)."""
    for path in paths:
        if path and osp.exists(path) and not force:
            raise FileExistsError(
                f'{path} exists; pass --force to overwrite it')


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_outputs(
        paths: Sequence[Optional[str]]) -> Iterator[List[Optional[str]]]:
    """Temporary paths beside ``paths``, renamed onto them together when the
    block succeeds and removed when it fails.

    A temporary name keeps its output's extension (``w.pth`` ->
    ``.w.pth.xxxx.part.pth``), for writers that choose the format from it
    (matplotlib's ``savefig``, ``np.savez``). Folders are created.

    Args:
        paths (Sequence[str | None]): the outputs (None: not written).

    Yields:
        list: one temporary path per output (None for None).
    """
    pending = []
    try:
        for path in paths:
            if path is None:
                pending.append(None)
                continue
            folder = osp.dirname(osp.abspath(path))
            os.makedirs(folder, exist_ok=True)
            name = osp.basename(path)
            fd, tmp = tempfile.mkstemp(
                dir=folder,
                prefix=f'.{name}.',
                suffix='.part' + osp.splitext(name)[1])
            os.close(fd)
            pending.append(tmp)
            # mkstemp's 0600 would make every output private: the mode an
            # ordinary open() gives instead.
            os.chmod(tmp, 0o666 & ~_umask())
        yield pending
        for tmp, path in zip(pending, paths):
            if tmp is not None:
                os.replace(tmp, path)
    finally:
        for tmp in pending:
            if tmp is not None and osp.exists(tmp):
                os.remove(tmp)


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """``write(tmp)`` to a temporary name beside ``path``, then rename.

    Returns:
        str: ``path``.
    """
    with atomic_outputs([path]) as (tmp, ):
        write(tmp)
    return path


def _weights_only_reason(error: Exception) -> str:
    """The one informative line of torch's weights-only error."""
    text = str(error)
    marker = 'WeightsUnpickler error:'
    if marker in text:
        rest = text.split(marker, 1)[1].strip()
        return rest.splitlines()[0].strip() if rest else text
    return text.splitlines()[0] if text else type(error).__name__


def load_torch_file(path: str, what: str = 'checkpoint'):
    """``torch.load(path, weights_only=True)`` on the CPU, with one clear
    error naming the file.

    A run checkpoint written before :class:`PortableCheckpointHook` (an
    MMEngine message hub inside) is read inside the scoped allow-list of
    :func:`moe_plugin.compat.run_checkpoint_scope`. Nothing is ever loaded
    with ``weights_only=False``.

    Args:
        path (str): the file.
        what (str): what the file is, for the messages. Defaults to
            'checkpoint'.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a PyTorch checkpoint (text, random
            bytes, truncated) or holds objects other than tensors and
            containers (the unsupported type named).
    """
    import torch

    from .compat import run_checkpoint_scope
    if not osp.isfile(path):
        raise FileNotFoundError(f'{what} {path} does not exist')
    try:
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:
            if not zipfile.is_zipfile(path):
                raise
            with run_checkpoint_scope():
                return torch.load(
                    path, map_location='cpu', weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch's unpickler fails in many ways
        raise (checkpoint_error(path, error, what)
               or ValueError(f'{what} {path} is not a PyTorch checkpoint '
                             f'(corrupt or truncated, or another format: '
                             f'{type(error).__name__})')) from error


def checkpoint_error(path: str,
                     error: Exception,
                     what: str = 'checkpoint') -> Optional[ValueError]:
    """One clear error for ``torch.load`` failing on the file ``path``, or
    None when the failure is not the file's (then re-raise ``error``).

    A file that is not a zip archive (PyTorch's format since 1.6) is "not
    a PyTorch checkpoint" (a text file, random bytes, a truncated file);
    a zip archive that the weights-only unpickler refuses holds objects
    other than tensors and containers, named from torch's message.
    """
    if isinstance(error, OSError) or not osp.isfile(path):
        return None
    if not zipfile.is_zipfile(path):
        return ValueError(f'{what} {path} is not a PyTorch checkpoint '
                          f'(corrupt or truncated, or another format)')
    if isinstance(error, pickle.UnpicklingError):
        return ValueError(
            f'{what} {path} holds objects that torch.load(weights_only='
            f'True) does not read: {_weights_only_reason(error)}')
    return None
