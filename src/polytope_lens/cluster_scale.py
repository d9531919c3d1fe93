"""HDBSCAN for millions of packed codes: a faiss Hamming kNN graph, a sparse mutual-reachability MST, sklearn's tree.

``ScalableCodeClusterer`` computes the same hierarchy as ``CodeClusterer(method="hdbscan")`` (sklearn's exact
HDBSCAN over the dense distance matrix) without ever forming the ``rows x rows`` matrix:

1. **kNN graph.** Each row's ``n_neighbors`` nearest rows (itself included) under the Hamming distance, from a faiss
   binary index over the packed bytes (faiss takes ``d = 8 * bytes`` bits; our rows are whole bytes). ``index="flat"``
   (``IndexBinaryFlat``) is an exact search, O(rows^2 * bytes) popcounts; ``"hnsw"`` (``IndexBinaryHNSW``) is an
   approximate one, ~O(rows log rows); ``"auto"`` takes ``flat`` up to ``flat_max_rows`` rows. Distances are
   integers, so ties are common; faiss breaks them by its own order.
   *Jaccard*: faiss has no Jaccard index. Candidates are the ``jaccard_candidates * n_neighbors`` nearest rows by
   Hamming distance, re-ranked by their exact Jaccard distance (computed from the Hamming distance and the two
   popcounts with ``codes.jaccard``'s formula, so values are bit-identical), keeping the ``n_neighbors`` best. A true
   Jaccard neighbour that is not among the Hamming candidates is missed (rows with very different popcounts), so the
   Jaccard graph is approximate even with the flat index; the tests measure its agreement with exact HDBSCAN.
2. **Core distances** are the distance to the ``min_samples``-th neighbour counting the row itself, as in sklearn.
3. **Mutual reachability** ``max(core_i, core_j, d_ij)`` on the kNN edges, made symmetric. If the graph has several
   connected components they are bridged at the component level: up to ``bridge_samples`` members of each
   component are searched against each other (a flat index, widening ``k`` until the component graph connects), and
   every inter-component candidate edge is added with its exact mutual-reachability weight. The lightest edge between
   two given components need not be among them (a tester found component pairs without any edge); in 200 random
   trials of up to 15 components with all members sampled the spanning tree's weight still equalled the exact one.
4. **Minimum spanning forest** with ``scipy.sparse.csgraph.minimum_spanning_tree`` (weights shifted by +1 so that
   zero-distance duplicates stay edges; the weights of the tree's edges are recomputed exactly afterwards).
5. **Hierarchy and selection** by sklearn's own HDBSCAN kernels (``make_single_linkage`` then ``tree_to_labels``:
   condensed tree, excess-of-mass selection, probabilities), wrapped once in ``_sklearn_tree``. A
   ``cluster_selection_epsilon`` > 0 is applied by ``_tree_labels`` as sklearn specifies it (sklearn <= 1.9.1's own
   step raises under NumPy >= 2.4).

When is it exact? The MST of the full mutual-reachability graph uses only kNN edges whenever, for every pair split
by a minimum cut, the lightest crossing edge joins rows within ``n_neighbors`` of each other; edges past both rows'
``min_samples``-th neighbours weigh their plain distance, so ``n_neighbors`` well above ``min_samples`` makes missed
edges rare. The labels then equal sklearn's up to ties: equal merge heights (frequent with integer Hamming distances)
may be merged in another order, which can move rows between sibling clusters born at the same height. The tests
bound the adjusted Rand index against ``sklearn.cluster.HDBSCAN(metric="precomputed")``.

Cost: the flat search dominates (~5e7 row pairs/s on 2 cores at 3072 bits); HNSW makes 100k rows a matter of tens
of seconds and 1M rows tens of minutes. Memory: ``rows * n_neighbors`` edges (~24 bytes each) plus the codes.
``ray_address`` shards the search's query rows over Ray workers (the same graph, see ``distributed``); building the
index, the MST and the tree stay in this process, and each worker holds its own copy of an HNSW index.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import InvalidInputError, MissingDependencyError

try:
    from scipy.sparse import coo_matrix, csgraph
    from sklearn.base import BaseEstimator, ClusterMixin
except ImportError:  # pragma: no cover - scikit-learn ships with the models extra
    raise MissingDependencyError(
        "Clustering needs scikit-learn; install it with pip install 'polytope-lens[models]'.") from None

__all__ = ["ScalableCodeClusterer", "knn_graph", "INDEXES"]

INDEXES = ("auto", "flat", "hnsw")
METRICS = ("hamming", "jaccard")
Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: stage is "knn", "bridge" or "tree"."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError("Scalable clustering needs faiss; install it with "
                                     "pip install 'polytope-lens[scale]' (or pip install faiss-cpu).") from None
    return faiss


def _sklearn_tree():
    """sklearn's private HDBSCAN kernels (stable from 1.3 to 1.9): the one place they are imported."""
    try:
        from sklearn.cluster._hdbscan._linkage import MST_edge_dtype, make_single_linkage
        from sklearn.cluster._hdbscan._tree import _condense_tree, _do_labelling, tree_to_labels
    except ImportError as e:  # pragma: no cover - a future sklearn moved them
        raise MissingDependencyError(f"This scikit-learn has no HDBSCAN kernels where expected ({e}); install "
                                     "scikit-learn>=1.3,<2.") from None
    return MST_edge_dtype, make_single_linkage, tree_to_labels, _condense_tree, _do_labelling


def _tree_labels(tree: np.ndarray, min_cluster_size: int, allow_single_cluster: bool,
                 epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities from a single-linkage tree: sklearn's excess-of-mass selection (``tree_to_labels``).

    A ``cluster_selection_epsilon`` > 0 is applied here, as sklearn's ``epsilon_search`` does it: a selected cluster
    born below ``epsilon`` (in distance) is replaced by its nearest ancestor born above it, at most a child of the
    root unless ``allow_single_cluster``. sklearn <= 1.9.1 raises a TypeError there under NumPy >= 2.4 whenever
    epsilon changes the selection (scikit-learn issue #33219); the selection without epsilon and the labelling stay
    sklearn's (``_condense_tree``, ``_do_labelling``); the membership probabilities follow its ``get_probabilities``.
    """
    _, _, tree_to_labels, _condense_tree, _do_labelling = _sklearn_tree()
    if epsilon == 0:
        return tree_to_labels(tree, min_cluster_size, "eom", allow_single_cluster, 0.0, None)
    ct = _condense_tree(tree, min_cluster_size)
    parent, child, lam, size = ct["parent"], ct["child"], ct["value"], ct["cluster_size"]
    root = int(parent.min())
    birth = np.zeros(max(int(child.max()), root) + 1)  # lambda = 1 / distance at which each node appears
    birth[child] = lam
    birth[root] = 0.0
    with np.errstate(divide="ignore"):
        born_at = (1.0 / birth).tolist()
    acc = np.zeros(int(parent.max()) + 1 - root)
    np.add.at(acc, parent - root, (lam - birth[parent]) * size)  # row order, as sklearn's _compute_stability
    stability = {root + i: float(v) for i, v in enumerate(acc)}
    ctree = ct[size > 1]
    kids: dict[int, list[int]] = {}
    up: dict[int, int] = {}
    for p, c in zip(ctree["parent"].tolist(), ctree["child"].tolist()):
        kids.setdefault(p, []).append(c)
        up[c] = p

    def below(node):  # node and every cluster under it
        out, queue = [], [node]
        while queue:
            out += queue
            queue = [c for q in queue for c in kids.get(q, [])]
        return out

    nodes = sorted(stability, reverse=True)[:None if allow_single_cluster else -1]
    chosen = dict.fromkeys(nodes, True)
    for node in nodes:  # excess of mass, children before parents
        sub = sum(stability[c] for c in kids.get(node, []))
        if sub > stability[node]:
            chosen[node], stability[node] = False, sub
        else:
            for c in below(node)[1:]:
                chosen[c] = False
    selected = {c for c in chosen if chosen[c]}
    if len(ctree) and selected != {root}:
        picked, processed = set(), set()
        for leaf in selected:
            if born_at[leaf] >= epsilon:
                picked.add(leaf)
            elif leaf not in processed:
                node = leaf
                while up[node] != root and born_at[up[node]] <= epsilon:
                    node = up[node]
                node = up[node] if up[node] != root or allow_single_cluster else node
                picked.add(node)
                processed.update(below(node)[1:])
        selected = picked
    elif len(ctree) and not allow_single_cluster:
        selected = set()
    label_of = {c: i for i, c in enumerate(sorted(selected))}
    labels = np.asarray(_do_labelling(ct, selected, label_of, allow_single_cluster, float(epsilon)), dtype=np.intp)
    # sklearn's max_lambdas: the largest lambda of each run of rows with one parent, the last run winning
    starts = np.flatnonzero(np.r_[True, parent[1:] != parent[:-1]])
    run_max = np.maximum.reduceat(lam, starts)
    run_parent, last = np.unique(parent[starts][::-1], return_index=True)
    death = np.zeros(int(parent.max()) + 1)
    death[run_parent] = run_max[::-1][last]
    node_of = np.array(sorted(selected) or [0], dtype=np.int64)
    probabilities = np.zeros(len(labels))
    point = child < root
    pts, pl = child[point], lam[point]
    members = labels[pts] != -1
    pts, pl = pts[members], pl[members]
    top = death[node_of[labels[pts]]]
    with np.errstate(invalid="ignore"):  # inf / inf where the point's lambda is inf: 1 below
        probabilities[pts] = np.where((top == 0) | np.isinf(pl), 1.0, np.minimum(pl, top) / np.where(top == 0, 1, top))
    return labels, probabilities


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x).sum(-1, dtype=np.int64)


def _jaccard_from(h: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """Jaccard distance from Hamming distance and popcounts, with ``codes.jaccard``'s exact formula."""
    inter = (pa + pb - h) // 2
    union = (pa + pb + h) // 2
    return np.where(union > 0, 1.0 - inter / np.maximum(union, 1), 0.0)


def _pair_distance(X: np.ndarray, a: np.ndarray, b: np.ndarray, metric: str, pop: np.ndarray | None,
                   step: int = 65536) -> np.ndarray:
    """Exact distances between rows ``a[i]`` and ``b[i]``, in chunks."""
    out = np.empty(len(a), dtype=np.float64)
    for s in range(0, len(a), step):
        h = _popcount(X[a[s:s + step]] ^ X[b[s:s + step]])
        out[s:s + step] = h if metric == "hamming" else _jaccard_from(h, pop[a[s:s + step]], pop[b[s:s + step]])
    return out


def _make_index(X: np.ndarray, index: str, hnsw_m: int, ef_construction: int, ef_search: int):
    faiss = _faiss()
    d = X.shape[1] * 8
    if index == "flat":
        idx = faiss.IndexBinaryFlat(d)
    else:
        idx = faiss.IndexBinaryHNSW(d, hnsw_m)
        idx.hnsw.efConstruction = ef_construction
    idx.add(X)
    if index == "hnsw":
        idx.hnsw.efSearch = max(ef_search, 1)
    return idx


def _load_index(X: np.ndarray, index_bytes, ef_search: int):
    """A Ray worker's copy of the driver's index: deserialized (HNSW, ``efSearch`` restored) or, when
    ``index_bytes`` is None, an exact flat index over ``X`` (adding to a flat index only copies the codes)."""
    if index_bytes is None:
        return _make_index(X, "flat", 0, 0, 0)
    idx = _faiss().deserialize_index_binary(index_bytes)
    idx.hnsw.efSearch = max(ef_search, 1)
    return idx


def _search_rows(idx, X: np.ndarray, s: int, e: int, k: int, kc: int, metric: str,
                 pop: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices (e - s, k) of rows ``s:e``'s nearest rows; ``kc`` Hamming candidates for Jaccard.

    faiss answers each query on its own, so the rows of a block do not depend on the block (checked in the tests):
    the single-process loop and the Ray workers (``distributed.ray_knn_blocks``) both call this.
    """
    dh, ih = idx.search(X[s:e], kc)
    if metric != "jaccard":
        return dh.astype(np.float64), ih
    valid = ih >= 0
    dj = _jaccard_from(dh.astype(np.int64), pop[s:e, None], pop[np.where(valid, ih, 0)])
    dj = np.where(valid, dj, np.inf)
    order = np.argsort(dj, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dj, order, 1), np.take_along_axis(ih, order, 1)


def knn_graph(X: np.ndarray, n_neighbors: int, *, metric: str = "hamming", index: str = "flat",
              flat_max_rows: int = 20_000, jaccard_candidates: int = 4, hnsw_m: int = 32, ef_search: int = 128,
              ef_construction: int = 64, chunk_rows: int = 8192, progress: Progress | None = None,
              ray_address: str | None = None, ray_workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``n_neighbors`` nearest rows (itself included, usually first) and their distances.

    Parameters
    ----------
    X : ndarray of uint8 (rows, bytes)
        Packed codes.
    n_neighbors : int
        Neighbours per row, counting the row itself (at most ``rows``).
    metric : {"hamming", "jaccard"}
        Jaccard re-ranks ``jaccard_candidates * n_neighbors`` Hamming candidates (see the module docstring).
    index : {"flat", "hnsw", "auto"}
        Exact or approximate faiss binary index; ``"auto"`` is ``"flat"`` up to ``flat_max_rows`` rows, as in
        ``ScalableCodeClusterer``.
    ray_address : str, optional
        Search blocks of query rows on Ray workers (``"local"``, ``"auto"``, ``"HOST:PORT"``; see ``distributed``):
        the index is built here once and shipped to them; the graph is identical to a single-process search.
    ray_workers : int, optional
        Ray workers (default: one per CPU of the cluster).

    Returns
    -------
    distances : ndarray of float64 (rows, n_neighbors), ascending per row
    indices : ndarray of int64 (rows, n_neighbors); -1 where the index found fewer neighbours
    """
    from .cluster import _as_packed, _int_at_least, _one_of

    owner = "knn_graph"
    _one_of(owner, "metric", metric, METRICS)
    _one_of(owner, "index", index, INDEXES)
    for name, value in (("n_neighbors", n_neighbors), ("flat_max_rows", flat_max_rows),
                        ("jaccard_candidates", jaccard_candidates), ("hnsw_m", hnsw_m), ("ef_search", ef_search),
                        ("ef_construction", ef_construction), ("chunk_rows", chunk_rows)):
        _int_at_least(owner, name, value, 1)
    _int_at_least(owner, "ray_workers", ray_workers, 1, optional=True)
    X = _as_packed(X, owner)
    n = len(X)
    if index == "auto":
        index = "flat" if n <= flat_max_rows else "hnsw"
    k = min(n, n_neighbors)
    kc = k if metric == "hamming" else min(n, k * jaccard_candidates)
    if index == "hnsw":
        ef_search = max(ef_search, kc)
    idx = _make_index(X, index, hnsw_m, ef_construction, ef_search)
    D = np.empty((n, k), dtype=np.float64)
    Ind = np.empty((n, k), dtype=np.int64)
    if ray_address is not None:
        from .distributed import ray_knn_blocks

        blob = None if index == "flat" else _faiss().serialize_index_binary(idx)
        del idx  # the workers hold their own copies
        blocks = ray_knn_blocks(ray_address, X, blob, k=k, kc=kc, metric=metric, ef_search=ef_search,
                                workers=ray_workers, block_rows=chunk_rows)
    else:
        pop = _popcount(X) if metric == "jaccard" else None
        blocks = ((s, *_search_rows(idx, X, s, min(n, s + chunk_rows), k, kc, metric, pop))
                  for s in range(0, n, chunk_rows))
    try:
        for s, d, i in blocks:
            D[s:s + len(d)], Ind[s:s + len(d)] = d, i
            if progress is not None:
                progress("knn", s + len(d), n)
    finally:  # an error here (a progress callback's) must not leave Ray's actors waiting on a suspended generator
        blocks.close()
    D[Ind < 0] = np.inf
    return D, Ind


def _bridge_edges(X, comp, n_comp, bridge_samples, rng, progress):
    """Candidate edges (rows a, rows b) joining the kNN graph's components, found among sampled members.

    Up to ``bridge_samples`` members per component (fewer when there are many components) are searched against
    each other with an exact flat index, widening k until the candidate edges connect every component.
    """
    faiss = _faiss()
    per = max(1, min(bridge_samples, max(8192, 2 * n_comp) // n_comp))
    order = np.argsort(comp, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(comp, minlength=n_comp))])
    picks = []
    for c in range(n_comp):
        members = order[bounds[c]:bounds[c + 1]]
        picks.append(members if len(members) <= per else np.sort(rng.choice(members, per, replace=False)))
    sample = np.concatenate(picks)
    scomp = comp[sample]
    idx = faiss.IndexBinaryFlat(X.shape[1] * 8)
    idx.add(X[sample])
    k = min(len(sample), 2 * per + 8)
    while True:
        _, I = idx.search(X[sample], k)
        qi = np.repeat(np.arange(len(sample)), k)
        ri = I.ravel()
        keep = (ri >= 0) & (scomp[qi] != scomp[np.maximum(ri, 0)])
        a, b = sample[qi[keep]], sample[ri[keep]]
        joined = csgraph.connected_components(
            coo_matrix((np.ones(len(a)), (comp[a], comp[b])), shape=(n_comp, n_comp)), directed=False)[0]
        if progress is not None:
            progress("bridge", n_comp - joined, n_comp - 1)
        if joined == 1 or k >= len(sample):
            return a, b
        k = min(len(sample), 2 * k)


class ScalableCodeClusterer(ClusterMixin, BaseEstimator):
    """HDBSCAN of packed codes through a faiss kNN graph; agrees with exact HDBSCAN, scales to millions of rows.

    Parameters
    ----------
    metric : {"hamming", "jaccard"}
        Distance between codes, as in ``CodeClusterer``.
    min_cluster_size, min_samples, cluster_selection_epsilon, allow_single_cluster
        HDBSCAN's parameters (``min_samples`` defaults to ``min_cluster_size``; it counts the row itself).
    n_neighbors : int, optional
        Neighbours per row in the kNN graph, the row included (default ``max(2 * min_samples, 16)``). Larger is
        closer to exact HDBSCAN, slower, and more memory; where many distances tie, exact HDBSCAN's own answer
        depends on the order it merges equal heights in (docs/scale.md).
    index : {"auto", "flat", "hnsw"}
        faiss index for the kNN search: exact ``flat`` or approximate ``hnsw``; ``auto`` is ``flat`` up to
        ``flat_max_rows`` rows. ``knn_exact_`` says which was used.
    flat_max_rows : int
        Largest input that ``index="auto"`` searches exactly.
    jaccard_candidates : int
        Jaccard only: Hamming candidates per row, as a multiple of ``n_neighbors``, re-ranked by Jaccard distance.
    hnsw_m, ef_search, ef_construction
        HNSW graph degree and search/build beam widths.
    bridge_samples : int
        Members per kNN-graph component searched when bridging components.
    random_state : int
        Seed of the bridge sampling.
    ray_address : str, optional
        Shard the kNN search (the expensive step) over Ray workers: ``"local"``, ``"auto"``, ``"HOST:PORT"`` or
        ``"ray://HOST:PORT"`` (``pip install 'polytope-lens[scale]'``; see ``distributed``). The index is built here
        and shipped once; each worker searches blocks of query rows; the rest runs here. The labels equal a
        single-process fit's (faiss answers each query independently).
    ray_workers : int, optional
        Ray workers (default: one per CPU of the cluster).

    Attributes
    ----------
    labels_ : ndarray of int64 (rows,)
        Cluster per row; ``cluster.NOISE`` (-1) for unclustered rows.
    probabilities_ : ndarray of float64 (rows,)
        HDBSCAN membership strength.
    n_clusters_, noise_fraction_ : int, float
        Clusters found (noise not counted) and the fraction of noise rows.
    core_distances_ : ndarray of float64 (rows,)
    n_components_ : int
        Connected components of the kNN graph before bridging.
    knn_exact_ : bool
        Whether the kNN graph is exact: a flat index, and for Jaccard every row among the Hamming candidates
        (otherwise a Jaccard neighbour outside them can be missed: approximate).
    single_linkage_tree_ : ndarray
        sklearn's single-linkage hierarchy (``HIERARCHY_dtype``).

    Examples
    --------
    >>> X = np.repeat(np.array([[0x00, 0x00], [0xFF, 0xFF]], dtype=np.uint8), 10, axis=0)   # (20 rows, 2 bytes)
    >>> ScalableCodeClusterer(min_cluster_size=5).fit(X).n_clusters_
    2
    """

    _owner = "ScalableCodeClusterer"

    def __init__(self, *, metric: str = "hamming", min_cluster_size: int = 5, min_samples: int | None = None,
                 n_neighbors: int | None = None, index: str = "auto", flat_max_rows: int = 20_000,
                 cluster_selection_epsilon: float = 0.0, allow_single_cluster: bool = False,
                 jaccard_candidates: int = 4, hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 64,
                 bridge_samples: int = 64, random_state: int = 0, ray_address: str | None = None,
                 ray_workers: int | None = None):
        self.metric = metric
        self.min_cluster_size = min_cluster_size
        self.min_samples = min_samples
        self.n_neighbors = n_neighbors
        self.index = index
        self.flat_max_rows = flat_max_rows
        self.cluster_selection_epsilon = cluster_selection_epsilon
        self.allow_single_cluster = allow_single_cluster
        self.jaccard_candidates = jaccard_candidates
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.ef_construction = ef_construction
        self.bridge_samples = bridge_samples
        self.random_state = random_state
        self.ray_address = ray_address
        self.ray_workers = ray_workers

    def _validate(self, n: int) -> tuple[int, int, str]:
        from .cluster import _epsilon_at_least_zero, _int_at_least, _one_of

        owner = self._owner
        _one_of(owner, "metric", self.metric, METRICS)
        _one_of(owner, "index", self.index, INDEXES)
        _int_at_least(owner, "min_cluster_size", self.min_cluster_size, 2)
        _int_at_least(owner, "min_samples", self.min_samples, 1, optional=True)
        _int_at_least(owner, "n_neighbors", self.n_neighbors, 2, optional=True)
        for name in ("flat_max_rows", "jaccard_candidates", "hnsw_m", "ef_search", "ef_construction",
                     "bridge_samples"):
            _int_at_least(owner, name, getattr(self, name), 1)
        _epsilon_at_least_zero(owner, self.cluster_selection_epsilon)
        if self.ray_address is not None and not isinstance(self.ray_address, str):
            raise InvalidInputError(f"The 'ray_address' parameter of {owner} must be a str ('local', 'auto', "
                                    f"'HOST:PORT') or None. Got {self.ray_address!r} instead.")
        _int_at_least(owner, "ray_workers", self.ray_workers, 1, optional=True)
        if n < 2:
            raise InvalidInputError(f"{owner} needs at least 2 rows to cluster; got {n}.")
        min_samples = self.min_cluster_size if self.min_samples is None else self.min_samples
        if min_samples > n:
            which = "min_cluster_size" if self.min_samples is None else "min_samples"  # min_samples defaults to it
            raise InvalidInputError(f"The {which!r} parameter of {owner} ({min_samples}) must be at most the "
                                    f"number of rows ({n}).")
        k = max(2 * min_samples, 16) if self.n_neighbors is None else self.n_neighbors
        if k < min_samples:
            raise InvalidInputError(f"The 'n_neighbors' parameter of {owner} ({k}) must be at least min_samples "
                                    f"({min_samples}): core distances come from the kNN graph.")
        index = self.index if self.index != "auto" else ("flat" if n <= self.flat_max_rows else "hnsw")
        return min_samples, min(k, n), index

    def fit(self, X, y=None, *, progress: Progress | None = None) -> "ScalableCodeClusterer":
        """Cluster the rows of ``X`` (packed uint8 codes (rows, bytes), a ``SplineCodes`` or a ``LayerCodes``).

        ``progress(stage, done, total)`` is called as the kNN search advances ("knn"), while components are
        bridged ("bridge") and once the tree is built ("tree").
        """
        from .cluster import NOISE, _as_packed

        X = _as_packed(X, self._owner)
        n = len(X)
        min_samples, k, index = self._validate(n)
        pop = _popcount(X) if self.metric == "jaccard" else None
        D, Ind = knn_graph(X, k, metric=self.metric, index=index, jaccard_candidates=self.jaccard_candidates,
                           hnsw_m=self.hnsw_m, ef_search=self.ef_search, ef_construction=self.ef_construction,
                           progress=progress, ray_address=self.ray_address, ray_workers=self.ray_workers)
        core = D[:, min_samples - 1].copy()
        rows = np.repeat(np.arange(n), k)
        cols = Ind.ravel()
        keep = (cols >= 0) & (cols != rows)
        a, b = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep])
        n_comp, comp = csgraph.connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)),
                                                    directed=False)
        self.n_components_ = int(n_comp)
        if n_comp > 1:
            ba, bb = _bridge_edges(X, comp, n_comp, self.bridge_samples, np.random.default_rng(self.random_state),
                                   progress)
            a = np.concatenate([a, np.minimum(ba, bb)])
            b = np.concatenate([b, np.maximum(ba, bb)])
        pairs = np.unique(a * np.int64(n) + b)  # one entry per undirected edge (coo would sum duplicates)
        a, b = pairs // n, pairs % n
        w = np.maximum(np.maximum(core[a], core[b]), _pair_distance(X, a, b, self.metric, pop))
        graph = coo_matrix((w + 1.0, (a, b)), shape=(n, n)).tocsr()  # +1: zero-weight edges stay edges
        mst = csgraph.minimum_spanning_tree(graph).tocoo()
        ma, mb = mst.row.astype(np.int64), mst.col.astype(np.int64)
        if len(ma) != n - 1:  # pragma: no cover - bridging guarantees one component
            raise AssertionError(f"The spanning forest has {len(ma)} edges for {n} rows; expected {n - 1}.")
        mw = np.maximum(np.maximum(core[ma], core[mb]), _pair_distance(X, ma, mb, self.metric, pop))
        edge_dtype, make_single_linkage = _sklearn_tree()[:2]
        order = np.argsort(mw, kind="stable")
        edges = np.rec.fromarrays([ma[order], mb[order], mw[order]], dtype=edge_dtype)
        self.single_linkage_tree_ = make_single_linkage(edges)
        labels, probabilities = _tree_labels(self.single_linkage_tree_, self.min_cluster_size,
                                             self.allow_single_cluster, float(self.cluster_selection_epsilon))
        if progress is not None:
            progress("tree", 1, 1)
        self.labels_ = np.asarray(labels, dtype=np.int64)
        self.probabilities_ = np.asarray(probabilities, dtype=np.float64)
        self.core_distances_ = core
        # Jaccard re-ranks Hamming candidates: exact only when every row is a candidate (``knn_graph``'s kc = n)
        self.knn_exact_ = index == "flat" and (self.metric == "hamming" or k * max(1, self.jaccard_candidates) >= n)
        self.n_clusters_ = int(len(np.setdiff1d(np.unique(self.labels_), [NOISE])))
        self.noise_fraction_ = float(np.mean(self.labels_ == NOISE))
        return self
