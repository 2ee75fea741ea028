"""The recycling benchmark's summary: its format, table and figures.

``tools/demo/recycling_demo.py --dataset fashion_mnist`` writes, per
downstream training-set size, a ``summary.json``::

    {"dataset": "fashion_mnist", "upstream_classes": [0, 1, 2, 3, 4],
     "downstream_classes": [5, 6, 7, 8, 9], "epochs": 16,
     "train_images_per_class": 100, "seeds": [0, 1, 2],
     "dense_upstream": [top-1 per seed],
     "runs": {"scratch": [[top-1 after each epoch] for each seed],
              "upcycle": ..., "sphero_importance": ...,
              "dense_finetune": ...},
     "seconds": {...}, "cpu_seconds": {...}}

(top-1 in percent on the downstream test images), and for several sizes a
``size_sweep.json`` holding ``{"train_images_per_class": [...],
"summaries": [summary per size]}``. This module checks that format, turns
it into the benchmark's table (final top-1 mean ± std over seeds, the first
epoch at which the mean curve reaches the scratch MoE's final mean, the
paired difference to ``dense_finetune`` with its standard error) and draws
``curves.png`` and ``size_sweep.png``.
"""
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

SCRATCH, BASELINE = 'scratch', 'dense_finetune'
SUMMARY_KEYS = ('dataset', 'upstream_classes', 'downstream_classes',
                'epochs', 'seeds', 'dense_upstream', 'runs')


def check_summary(summary: Dict) -> None:
    """Raise ``ValueError`` naming the key unless ``summary`` has the
    benchmark's format: every run one curve of ``epochs`` values per
    seed, ``dense_upstream`` one value per seed."""
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise ValueError(f'summary lacks {missing}')
    seeds, epochs = len(summary['seeds']), summary['epochs']
    if len(summary['dense_upstream']) != seeds:
        raise ValueError(f"dense_upstream has {len(summary['dense_upstream'])}"
                         f' values for {seeds} seeds')
    if SCRATCH not in summary['runs']:
        raise ValueError(f"summary runs lack '{SCRATCH}'")
    for name, curves in summary['runs'].items():
        shape = np.asarray(curves, dtype=float).shape
        if shape != (seeds, epochs):
            raise ValueError(f'runs.{name} has shape {shape}, expected '
                             f'(seeds, epochs) = ({seeds}, {epochs})')


def reach_epoch(curve: Sequence[float], target: float) -> Optional[int]:
    """First epoch (1-based) at which ``curve`` is ``>= target``, or None."""
    return next((e + 1 for e, v in enumerate(curve) if v >= target), None)


def _std(values: np.ndarray) -> float:
    """Sample standard deviation (0 for one value)."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def table_rows(summary: Dict) -> List[Dict]:
    """One row per run of ``summary``.

    Returns:
        list[dict]: ``run``, ``final_mean``, ``final_std`` (sample std over
        seeds), ``reach`` (first epoch at which the run's mean curve
        reaches the scratch run's final mean, None if never),
        ``vs_dense`` and ``vs_dense_se`` (mean over seeds of the run's
        final minus ``dense_finetune``'s of the same seed, and its
        standard error; None without a ``dense_finetune`` run, the error
        None for one seed).
    """
    check_summary(summary)
    curves = {
        name: np.asarray(c, dtype=float)
        for name, c in summary['runs'].items()
    }
    target = curves[SCRATCH][:, -1].mean()
    rows = []
    for name, curve in curves.items():
        final = curve[:, -1]
        row = dict(
            run=name,
            final_mean=float(final.mean()),
            final_std=_std(final),
            reach=reach_epoch(curve.mean(0), target),
            vs_dense=None,
            vs_dense_se=None)
        if BASELINE in curves:
            diff = final - curves[BASELINE][:, -1]
            row['vs_dense'] = float(diff.mean())
            if len(diff) > 1:
                row['vs_dense_se'] = _std(diff) / math.sqrt(len(diff))
        rows.append(row)
    return rows


def format_table(summary: Dict) -> str:
    """The table of :func:`table_rows` as text."""
    rows = table_rows(summary)
    epochs = summary['epochs']
    seeds = len(summary['seeds'])
    up = np.asarray(summary['dense_upstream'], dtype=float)
    lines = [
        f"{summary['dataset']}: upstream classes "
        f"{summary['upstream_classes']} (dense ViT {up.mean():.1f} ± "
        f'{_std(up):.1f} % top-1), downstream classes '
        f"{summary['downstream_classes']}"
        + (f", {summary['train_images_per_class']} training images per "
           'class' if summary.get('train_images_per_class') else '')
        + f', {epochs} epochs, {seeds} seed{"s" if seeds > 1 else ""}',
        f"{'run':<18}{'final top-1':>16}{'reaches scratch':>17}"
        f"{'vs dense_finetune':>20}"
    ]
    for row in rows:
        reach = (f"{row['reach']}/{epochs}" if row['reach'] else 'never')
        if row['vs_dense'] is None:
            diff = '-'
        elif row['run'] == BASELINE:
            diff = '0'
        else:
            diff = f"{row['vs_dense']:+.1f}"
            if row['vs_dense_se'] is not None:
                diff += f" ± {row['vs_dense_se']:.1f}"
        final = f"{row['final_mean']:.1f} ± {row['final_std']:.1f}"
        lines.append(f"{row['run']:<18}{final:>16}{reach:>17}{diff:>20}")
    return '\n'.join(lines)


def sweep_rows(sweep: Dict) -> List[Dict]:
    """Rows ``size``, ``run``, ``final_mean``, ``final_std``, ``reach``
    (see :func:`table_rows`), ``vs_dense``, ``vs_dense_se`` of a size
    sweep, size by size."""
    sizes = sweep['train_images_per_class']
    if len(sizes) != len(sweep['summaries']):
        raise ValueError(f'size sweep has {len(sizes)} sizes and '
                         f"{len(sweep['summaries'])} summaries")
    out = []
    for size, summary in zip(sizes, sweep['summaries']):
        for row in table_rows(summary):
            out.append(dict(size=size, **row))
    return out


def format_sweep_table(sweep: Dict) -> str:
    """Final top-1 and the epoch reaching scratch's final, per size."""
    rows = sweep_rows(sweep)
    runs = list(dict.fromkeys(r['run'] for r in rows))
    epochs = sweep['summaries'][0]['epochs']
    lines = [
        'final top-1 (epoch of ' + str(epochs) +
        " at which the run reaches scratch's final)",
        f"{'images/class':<14}" + ''.join(f'{r:>20}' for r in runs)
    ]
    for size in sweep['train_images_per_class']:
        cells = []
        for run in runs:
            row = next(r for r in rows
                       if r['size'] == size and r['run'] == run)
            reach = row['reach'] if row['reach'] else '-'
            cells.append(f"{row['final_mean']:.1f} ({reach})")
        lines.append(f'{size:<14}' + ''.join(f'{c:>20}' for c in cells))
    return '\n'.join(lines)


def plot_curves(summary: Dict, path: str) -> str:
    """Downstream top-1 after each epoch, mean over seeds with a ± std
    band, one line per run; the scratch run's final mean dotted."""
    from .plots import _figure, _save
    check_summary(summary)
    figure = _figure(6.4, 4.2)
    ax = figure.add_subplot()
    epochs = np.arange(1, summary['epochs'] + 1)
    for name, curves in summary['runs'].items():
        curves = np.asarray(curves, dtype=float)
        mean = curves.mean(0)
        std = curves.std(0, ddof=1) if len(curves) > 1 else 0 * mean
        (line, ) = ax.plot(epochs, mean, marker='o', markersize=3,
                           label=name)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2,
                        color=line.get_color())
    final = np.asarray(summary['runs'][SCRATCH], dtype=float)[:, -1].mean()
    ax.axhline(final, color='grey', linestyle=':', linewidth=1,
               label=f"scratch's final ({final:.1f})")
    seeds = len(summary['seeds'])
    size = summary.get('train_images_per_class')
    ax.set_title(
        f"{summary['dataset']}: classes {summary['upstream_classes']} → "
        f"{summary['downstream_classes']}"
        + (f', {size} images/class' if size else '')
        + f' ({seeds} seed{"s" if seeds > 1 else ""}, mean ± std)',
        fontsize=9)
    ax.set_xlabel('downstream epoch')
    ax.set_ylabel('test top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    return _save(figure, path)


def plot_size_sweep(sweep: Dict, path: str) -> str:
    """Final top-1 against the downstream images per class (log scale),
    one line per run, error bars ± std over seeds."""
    from .plots import _figure, _save
    rows = sweep_rows(sweep)
    figure = _figure(6.4, 4.2)
    ax = figure.add_subplot()
    for run in dict.fromkeys(r['run'] for r in rows):
        mine = [r for r in rows if r['run'] == run]
        ax.errorbar([r['size'] for r in mine],
                    [r['final_mean'] for r in mine],
                    yerr=[r['final_std'] for r in mine], marker='o',
                    capsize=3, label=run)
    first = sweep['summaries'][0]
    ax.set_xscale('log')
    ax.set_xticks(sweep['train_images_per_class'])
    ax.set_xticklabels([str(s) for s in sweep['train_images_per_class']])
    ax.set_title(
        f"{first['dataset']}: downstream classes "
        f"{first['downstream_classes']}, {first['epochs']} epochs",
        fontsize=9)
    ax.set_xlabel('downstream training images per class')
    ax.set_ylabel('final test top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    return _save(figure, path)
