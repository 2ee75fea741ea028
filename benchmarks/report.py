"""The benchmarks' output: a table on stdout and, with ``--json``, the same
rows as a JSON list of objects (written to a temporary name and renamed)."""
import json
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def report(rows: List[Dict],
           header: Sequence[str],
           width: int,
           json_path: Optional[str] = None,
           data=None) -> None:
    """Print ``rows`` as a table of ``header`` columns ``width`` wide; write
    ``data`` (default: the rows) to ``json_path`` when given."""
    print(' | '.join(f'{h:>{width}}' for h in header))
    for row in rows:
        print(' | '.join(f'{row[h]!s:>{width}}' for h in header))
    if json_path:
        from moe_plugin.fileio import atomic_write

        def write(tmp):
            with open(tmp, 'w') as f:
                json.dump(rows if data is None else data, f, indent=2)

        os.makedirs(osp.dirname(osp.abspath(json_path)), exist_ok=True)
        atomic_write(json_path, write)
