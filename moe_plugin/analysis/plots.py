"""PNG figures of the analysis tools (matplotlib, imported only here).

Figures are drawn on a :class:`matplotlib.figure.Figure` with the Agg
canvas, never through ``pyplot``: no global state, no display needed, and
the caller's backend is left alone. Each file is written to a temporary
name and renamed.
"""
from typing import Dict, List, Sequence

import numpy as np

from ..fileio import atomic_write


def _figure(width: float, height: float, layout=None):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            'the analysis plots need matplotlib (installed with mmengine): '
            'pip install matplotlib') from error
    figure = Figure(figsize=(width, height), dpi=110, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str) -> str:
    return atomic_write(path,
                        lambda tmp: figure.savefig(tmp, bbox_inches='tight'))


def plot_capacity_sweep(rows: List[Dict], path: str,
                        title: str = 'Capacity sweep') -> str:
    """Top-1 against the fraction of (token, choice) pairs processed.

    One line per (K, BPR): solid for BPR, dashed for vanilla routing; each
    point is labelled with its capacity factor.

    Args:
        rows (list[dict]): rows of
            :func:`~moe_plugin.analysis.sweep.capacity_sweep`.
        path (str): the PNG to write.
        title (str): Defaults to 'Capacity sweep'.

    Returns:
        str: ``path``.
    """
    figure = _figure(8.0, 4.6, layout='constrained')
    axes = figure.add_subplot()
    top_ks = sorted({row['top_k'] for row in rows})
    colours = dict(zip(top_ks, ('tab:blue', 'tab:orange', 'tab:green',
                                'tab:red', 'tab:purple', 'tab:brown')))
    for k_index, top_k in enumerate(top_ks):
        for priority in (False, True):
            line = sorted((r for r in rows
                           if r['top_k'] == top_k
                           and bool(r['batch_priority']) == priority),
                          key=lambda r: r['processed_fraction'])
            if not line:
                continue
            x = [100 * r['processed_fraction'] for r in line]
            y = [r['top1'] for r in line]
            axes.plot(x, y, marker='o' if priority else 's',
                      linestyle='-' if priority else '--',
                      color=colours.get(top_k, 'black'),
                      label=f'K={top_k}, ' + ('BPR' if priority else
                                              'vanilla'))
            # BPR's labels above left of its points, vanilla's below
            # right, each K a step further out (larger K, usually higher
            # lines: up for BPR, nearer for vanilla), so that neighbouring
            # lines' labels do not cover each other.
            step = 6 + 9 * (k_index if priority else len(top_ks) - 1 -
                            k_index)
            for r, xi, yi in zip(line, x, y):
                axes.annotate(f"c={r['capacity_factor']:g}", (xi, yi),
                              textcoords='offset points',
                              xytext=(-4, step) if priority else
                              (4, -step - 6),
                              ha='right' if priority else 'left',
                              fontsize=7,
                              color=colours.get(top_k, 'black'))
    axes.margins(x=0.08, y=0.15)
    axes.set_xlabel('(token, choice) pairs processed (%)')
    axes.set_ylabel('top-1 accuracy (%)')
    axes.set_title(title)
    axes.grid(alpha=0.3)
    # Outside the axes: inside, it hides the points and their labels.
    axes.legend(loc='upper left', bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return _save(figure, path)


def structure_order(matrix: np.ndarray):
    """Orders of rows (classes) and columns (experts) that show structure.

    Experts are sorted by the class where they peak, then by how strongly;
    classes by their strongest expert's position in that order, then by
    how strongly: a block-diagonal matrix comes out on the diagonal.

    Args:
        matrix (np.ndarray): ``[C, E]`` non-negative.

    Returns:
        tuple: ``(class_order, expert_order)`` index arrays.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    peak_class = matrix.argmax(0)
    expert_order = np.lexsort((-matrix.max(0), peak_class))
    position = np.empty_like(expert_order)
    position[expert_order] = np.arange(len(expert_order))
    best = matrix.argmax(1)
    class_order = np.lexsort((-matrix.max(1), position[best]))
    return class_order, expert_order


def plot_heatmap(matrix: np.ndarray,
                 class_names: Sequence[str],
                 path: str,
                 title: str,
                 order: bool = True,
                 colorbar_label: str = 'mean routing weight') -> str:
    """A (class, expert) heatmap with labels, colour bar and title.

    Args:
        matrix (np.ndarray): ``[C, E]``.
        class_names (Sequence[str]): ``C`` labels.
        path (str): the PNG to write.
        title (str): the title.
        order (bool): reorder classes and experts by
            :func:`structure_order`. Defaults to True.
        colorbar_label (str): Defaults to 'mean routing weight'.

    Returns:
        str: ``path``.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    classes, experts = matrix.shape
    if order:
        class_order, expert_order = structure_order(matrix)
    else:
        class_order, expert_order = np.arange(classes), np.arange(experts)
    shown = matrix[np.ix_(class_order, expert_order)]
    width = min(3.0 + 0.35 * experts, 24.0)
    height = min(2.0 + 0.3 * classes, 24.0)
    figure = _figure(max(width, 4.5), max(height, 3.5))
    axes = figure.add_subplot()
    image = axes.imshow(shown, aspect='auto', cmap='viridis',
                        interpolation='nearest', vmin=0.0)
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label(colorbar_label)
    label_size = 8 if max(classes, experts) <= 40 else 5
    if experts <= 64:
        axes.set_xticks(np.arange(experts))
        axes.set_xticklabels([str(e) for e in expert_order],
                             fontsize=label_size)
    if classes <= 100:
        axes.set_yticks(np.arange(classes))
        axes.set_yticklabels([class_names[c] for c in class_order],
                             fontsize=label_size)
    axes.set_xlabel('expert' + (' (ordered by peak class)' if order else ''))
    axes.set_ylabel('class')
    axes.set_title(title)
    return _save(figure, path)


def plot_overlays(picture: np.ndarray,
                  grid: tuple,
                  panels: Sequence[tuple],
                  path: str,
                  title: str) -> str:
    """The input and one panel per expert over it.

    Args:
        picture (np.ndarray): ``[H, W, 3]`` uint8 RGB, as the model sees it.
        grid (tuple): ``(rows, cols)`` of patches.
        panels (Sequence[tuple]): ``(name, weights, outline)``: ``weights``
            ``[rows * cols]`` in [0, 1] (a 0/1 mask or soft weights) drawn
            as a heat overlay, ``outline`` an optional ``[rows * cols]`` bool
            mask of patches outlined in red (dropped).
        path (str): the PNG to write.
        title (str): the figure title (may hold several lines).

    Returns:
        str: ``path``.
    """
    rows, cols = grid
    count = len(panels) + 1
    # At most 6 per row, rows filled evenly (7 panels: 4 + 3, not 6 + 1).
    lines = -(-count // 6)
    per_row = -(-count // lines)
    figure = _figure(2.3 * per_row + 0.8, 2.4 * lines + 0.5,
                     layout='constrained')
    height, width = picture.shape[:2]
    cell_h, cell_w = height / rows, width / cols
    everything = [('input', None, None)] + list(panels)
    # One scale for every panel, so that one colour bar reads them all.
    vmax = max([float(np.max(w)) for _, w, _ in panels if w is not None] +
               [1e-12])
    all_axes, heat_image = [], None
    for index, (name, weights, outline) in enumerate(everything):
        axes = figure.add_subplot(lines, per_row, index + 1)
        all_axes.append(axes)
        axes.imshow(picture, interpolation='nearest')
        if weights is not None:
            heat = np.asarray(weights, dtype=float).reshape(rows, cols)
            heat_image = axes.imshow(
                heat, cmap='magma', alpha=0.65, vmin=0.0, vmax=vmax,
                extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                interpolation='nearest')
        if outline is not None:
            ys, xs = np.nonzero(np.asarray(outline).reshape(rows, cols))
            for y, x in zip(ys, xs):
                axes.add_patch(
                    _rectangle((x * cell_w - 0.5, y * cell_h - 0.5), cell_w,
                               cell_h))
        axes.set_title(name, fontsize=8)
        axes.set_xticks([])
        axes.set_yticks([])
    if heat_image is not None:
        figure.colorbar(heat_image, ax=all_axes, shrink=0.8,
                        label='routing weight (1: taken)')
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def _rectangle(origin, width, height):
    from matplotlib.patches import Rectangle
    return Rectangle(origin, width, height, fill=False, edgecolor='red',
                     linewidth=1.2)
