"""Output files of the analysis tools: never overwritten without ``force``,
each written to a temporary name and renamed."""
import csv
import json
import os
import os.path as osp
from typing import Dict, Iterable, List, Sequence

import numpy as np

from ..fileio import atomic_write


def prepare_outputs(out_dir: str, names: Iterable[str],
                    force: bool = False) -> Dict[str, str]:
    """Create ``out_dir``; refuse if one of the files exists, unless forced.

    Args:
        out_dir (str): the output directory.
        names (Iterable[str]): the file names the tool will write.
        force (bool): overwrite existing files. Defaults to False.

    Returns:
        dict: name -> path.
    """
    paths = {name: osp.join(out_dir, name) for name in names}
    existing = [p for p in paths.values() if osp.exists(p)]
    if existing and not force:
        raise FileExistsError(
            f'{existing[0]} exists; pass --force to overwrite '
            f'({len(existing)} file(s) in {out_dir})')
    os.makedirs(out_dir, exist_ok=True)
    return paths


def write_json(path: str, data) -> str:

    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=2)

    return atomic_write(path, write)


def write_csv(path: str, rows: List[Dict], columns: Sequence[str]) -> str:

    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            for row in rows:
                writer.writerow({key: row.get(key, '') for key in columns})

    return atomic_write(path, write)


def write_npz(path: str, **arrays: np.ndarray) -> str:
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
