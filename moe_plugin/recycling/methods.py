"""Which hidden neurons of a dense MLP each expert takes.

Every method returns an index array ``[E, W]``: expert ``e`` is the
sub-network of the dense MLP made of hidden neurons ``indices[e]``
(rows of fc1, columns of fc2; fc2's bias is copied whole). Upcycling takes
all of them (``W = H``), the others a subset (``W <= H``), after MoE
Jetpack (arXiv 2406.04801, Table 3) and Sparse Upcycling (arXiv 2212.05055).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

METHODS = ('upcycle', 'random', 'uniform', 'importance', 'graph')
IMPORTANCE = ('l1', 'l2', 'freq')
SELECTIONS = ('sample', 'top')
GRAPHS = ('louvain', 'spectral', 'metis')
#: Methods that need activation statistics from calibration images.
CALIBRATED = ('importance', 'graph')


@dataclass(frozen=True)
class RecyclingOptions:
    """How the experts (and, for a wider dense model, the channels) are
    chosen: the options :func:`~moe_plugin.recycling.recycle_backbone`
    hands down to the selection functions.

    The values are checked where they are used (an unknown method by
    :func:`select_indices`, the importance metric only for the calibrated
    methods), so that each error names the setting that matters.

    Attributes:
        method (str): one of :data:`METHODS`. Defaults to 'upcycle'.
        importance (str): one of :data:`IMPORTANCE`, the calibrated metric.
            Defaults to 'l2'.
        selection (str): one of :data:`SELECTIONS`: importance sampling or
            the top neurons. Defaults to 'sample'.
        graph (str): one of :data:`GRAPHS`, the partitioning of the
            co-activation graph. Defaults to 'louvain'.
        seed (int): seed of the sampling, the partitioning and the noise.
            Defaults to 0.
        noise (float): std of Gaussian noise added to the expert kernels.
            Defaults to 0.
    """
    method: str = 'upcycle'
    importance: str = 'l2'
    selection: str = 'sample'
    graph: str = 'louvain'
    seed: int = 0
    noise: float = 0.0


def upcycle_indices(hidden: int, width: int, count: int) -> np.ndarray:
    """Every expert takes all ``H`` neurons: a copy of the dense MLP."""
    if width != hidden:
        raise ValueError(
            f"method 'upcycle' copies the dense MLP, so the expert width "
            f'must equal its hidden width {hidden}, got {width}; use a '
            "sampling method ('random', 'uniform', 'importance', 'graph')")
    return np.tile(np.arange(hidden), (count, 1))


def random_indices(hidden: int, width: int, count: int,
                   rng: np.random.Generator) -> np.ndarray:
    """An independent random subset per expert (sorted)."""
    return np.stack([
        np.sort(rng.choice(hidden, width, replace=False))
        for _ in range(count)
    ])


def uniform_indices(hidden: int, width: int, count: int) -> np.ndarray:
    """Evenly spaced neurons, the same for every expert."""
    return np.tile(
        np.floor(np.arange(width) * hidden / width).astype(np.int64),
        (count, 1))


def importance_indices(importance: np.ndarray, width: int, count: int,
                       rng: np.random.Generator,
                       selection: str = 'sample') -> np.ndarray:
    """Neurons drawn with probability proportional to their importance,
    without replacement (``sample``), or the ``width`` most important
    (``top``, the same for every expert)."""
    if selection not in SELECTIONS:
        raise ValueError(
            f'importance selection must be one of {SELECTIONS}, got '
            f'{selection!r}')
    hidden = importance.shape[0]
    if selection == 'top':
        return np.tile(np.sort(np.argsort(-importance, kind='stable')[:width]),
                       (count, 1))
    weights = np.clip(importance.astype(np.float64), 0, None) + 1e-12
    weights = weights / weights.sum()
    return np.stack([
        np.sort(rng.choice(hidden, width, replace=False, p=weights))
        for _ in range(count)
    ])


#: Louvain and METIS see each neuron's strongest co-activations only: the
#: full graph of H = 1536 neurons has 1.2 M edges, which networkx holds in
#: gigabytes and partitions in minutes.
NEIGHBOURS = 32


def keep_strongest_edges(weights: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest weights of each row, symmetrised (an edge stays
    when either end keeps it); the others set to 0."""
    keep = np.zeros_like(weights, dtype=bool)
    top = np.argpartition(-weights, k, axis=1)[:, :k]
    np.put_along_axis(keep, top, True, axis=1)
    keep |= keep.T
    return np.where(keep, weights, 0.0)


def partition_graph(coactivation: np.ndarray, parts: int, algorithm: str,
                    seed: int) -> np.ndarray:
    """Label each neuron with one of ``parts`` groups of a co-activation
    graph (weights ``coactivation[i, j]``, no self loops; for Louvain and
    METIS each neuron's :data:`NEIGHBOURS` strongest edges).

    Louvain finds its own number of communities: the largest are kept and
    the rest merged into the smallest groups until ``parts`` remain (or
    split by importance order when it finds fewer).
    """
    if algorithm not in GRAPHS:
        raise ValueError(
            f'graph partitioning must be one of {GRAPHS}, got {algorithm!r}')
    hidden = coactivation.shape[0]
    weights = np.array(coactivation, dtype=np.float64)
    np.fill_diagonal(weights, 0.0)
    if algorithm != 'spectral' and hidden > NEIGHBOURS:
        weights = keep_strongest_edges(weights, NEIGHBOURS)
    if algorithm == 'spectral':
        from sklearn.cluster import SpectralClustering
        return SpectralClustering(
            n_clusters=parts, affinity='precomputed',
            random_state=seed).fit_predict(weights + 1e-9)
    if algorithm == 'metis':
        try:
            import pymetis
        except ImportError as error:
            raise ImportError("--graph metis needs pymetis: pip install "
                              'moe_plugin[graph]') from error
        scaled = np.rint(weights / max(weights.max(), 1e-12) * 1000)
        xadj, adjncy, eweights = [0], [], []
        for i in range(hidden):
            nbrs = np.flatnonzero(scaled[i])
            adjncy.extend(nbrs.tolist())
            eweights.extend(scaled[i, nbrs].astype(int).tolist())
            xadj.append(len(adjncy))
        _, labels = pymetis.part_graph(
            parts, xadj=xadj, adjncy=adjncy, eweights=eweights)
        return np.asarray(labels)
    try:
        import networkx as nx
    except ImportError as error:
        raise ImportError('--graph louvain needs networkx: pip install '
                          'moe_plugin[graph]') from error
    graph = nx.from_numpy_array(weights)
    communities = sorted(
        (sorted(c) for c in nx.community.louvain_communities(
            graph, weight='weight', seed=seed)),
        key=lambda c: (-len(c), c[0]))
    labels = np.empty(hidden, dtype=np.int64)
    groups = communities[:parts]
    for extra in communities[parts:]:
        smallest = min(range(len(groups)), key=lambda g: len(groups[g]))
        groups[smallest] = groups[smallest] + extra
    while len(groups) < parts:  # split the largest group in two
        largest = max(range(len(groups)), key=lambda g: len(groups[g]))
        group = groups.pop(largest)
        groups += [group[:len(group) // 2], group[len(group) // 2:]]
    for label, group in enumerate(groups):
        labels[group] = label
    return labels


def graph_indices(coactivation: np.ndarray, importance: np.ndarray,
                  width: int, count: int, algorithm: str,
                  seed: int) -> np.ndarray:
    """One co-activation group per expert, cut or filled to ``width`` by
    importance (its most important members; then the most important
    neurons outside it)."""
    labels = partition_graph(coactivation, count, algorithm, seed)
    order = np.argsort(-importance, kind='stable')
    experts = []
    for expert in range(count):
        members = [n for n in order if labels[n] == expert][:width]
        chosen = set(members)
        members += [n for n in order if n not in chosen][:width - len(members)]
        experts.append(np.sort(np.asarray(members, dtype=np.int64)))
    return np.stack(experts)


def select_indices(options: RecyclingOptions,
                   hidden: int,
                   width: int,
                   count: int,
                   rng: np.random.Generator,
                   stats: Optional[dict] = None) -> np.ndarray:
    """Dispatch to ``options.method``.

    Args:
        options (RecyclingOptions): the method and its settings.
        hidden (int): ``H``, the dense MLP's hidden neurons.
        width (int): ``W``, hidden neurons per expert.
        count (int): ``E``, experts.
        rng (np.random.Generator): the sampling generator.
        stats (dict, optional): the block's calibration statistics (``l1``,
            ``l2``, ``freq`` ``[H]``, ``coactivation`` ``[H, H]``).
            Defaults to None.

    Returns:
        np.ndarray: ``[count, width]`` hidden-neuron indices, int64.
    """
    method, importance = options.method, options.importance
    if method not in METHODS:
        raise ValueError(f'unknown method {method!r}; valid: {METHODS}')
    if not 1 <= width <= hidden:
        raise ValueError(f'expert width {width} does not fit a dense MLP of '
                         f'{hidden} hidden neurons')
    if method == 'upcycle':
        return upcycle_indices(hidden, width, count)
    if method == 'random':
        return random_indices(hidden, width, count, rng)
    if method == 'uniform':
        return uniform_indices(hidden, width, count)
    if stats is None:
        raise ValueError(f'method {method!r} needs calibration statistics')
    if importance not in IMPORTANCE:
        raise ValueError(f'importance must be one of {IMPORTANCE}, got '
                         f'{importance!r}')
    scores = stats[importance]
    if method == 'importance':
        return importance_indices(scores, width, count, rng,
                                  options.selection)
    return graph_indices(stats['coactivation'], scores, width, count,
                         options.graph, options.seed)


def build_experts(fc1_weight: Tensor,
                  fc1_bias: Tensor,
                  fc2_weight: Tensor,
                  fc2_bias: Tensor,
                  indices: np.ndarray,
                  channels: Optional[np.ndarray] = None):
    """Stacked expert weights from a dense MLP and the neuron indices.

    Args:
        fc1_weight (Tensor): ``[H, D]``; fc1_bias ``[H]``.
        fc2_weight (Tensor): ``[D, H]``; fc2_bias ``[D]``.
        indices (np.ndarray): ``[E, W]`` hidden neurons of each expert.
        channels (np.ndarray, optional): ``[E, d]`` embedding channels each
            expert reads and writes (MoE Jetpack's original layout).
            Defaults to None (all ``D``).

    Returns:
        tuple: ``w1 [E, D, W]``, ``b1 [E, W]``, ``w2 [E, W, D]``,
        ``b2 [E, D]`` (the layout of :class:`BatchedExperts`; ``d`` for
        ``D`` with ``channels``).
    """
    index = torch.as_tensor(indices, dtype=torch.long)
    w1 = fc1_weight[index].transpose(1, 2)
    b1 = fc1_bias[index]
    w2 = fc2_weight.t()[index]
    b2 = fc2_bias.expand(index.shape[0], -1)
    if channels is not None:
        channel = torch.as_tensor(channels, dtype=torch.long)
        rows = torch.arange(index.shape[0])[:, None]
        w1 = w1[rows, channel]
        w2 = w2.gather(2, channel[:, None, :].expand(-1, w2.shape[1], -1))
        b2 = b2.gather(1, channel)
    return (w1.contiguous(), b1.contiguous(), w2.contiguous(),
            b2.contiguous())
