"""Output files written whole or not at all.

Every tool of the plugin that writes (recycled weights and their report,
converted checkpoints and configs, analysis tables and figures) writes each
file to a temporary name in its own folder and renames it when complete, so
an interrupted or failing run leaves neither a partial file nor a damaged
earlier output; an existing output is only replaced when asked (``force``).
"""
import os
import os.path as osp
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence


def check_outputs(paths: Sequence[Optional[str]], force: bool = False) -> None:
    """Raise ``FileExistsError`` naming the first existing output, unless
    ``force`` (None entries are skipped)."""
    for path in paths:
        if path and osp.exists(path) and not force:
            raise FileExistsError(
                f'{path} exists; pass --force to overwrite it')


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
