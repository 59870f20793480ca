"""Strategies: cluster one class's (or group's) maps to find the distinct ways it is explained.

Why: a class can be recognised in more than one way, and a minority way can be a shortcut
(SpRAy, Lapuschkin et al. 2019: a horse class recognised by a copyright tag). Clustering
the class's maps shows these strategies; ranking classes by how far a minority strategy
stands from the majority points at the "Clever Hans" candidates to look at first.

The method (spectral clustering as in SpRAy), on thumbnails (maps downsampled and scaled
to unit L2 norm, :func:`pipeline.analysis.descriptors.thumbnails`):

1. A symmetric k-nearest-neighbour graph (``min(10, n - 1)`` neighbours) with locally
   scaled Gaussian affinities ``exp(-d_ij^2 / (s_i s_j))``, ``s_i`` = the distance from
   ``i`` to its farthest kept neighbour (Zelnik-Manor & Perona 2004).
2. The normalised Laplacian ``I - D^-1/2 W D^-1/2``; for each k = 2..5, k-means
   (k-means++ seeding, fixed seed, 10 starts) on its row-normalised first ``k``
   eigenvectors.
3. **k by the silhouette** (Rousseeuw 1987), computed on the thumbnails themselves: the
   k with the largest mean silhouette, kept only if that silhouette is at least
   :data:`MIN_SILHOUETTE` = 0.5 (Kaufman & Rousseeuw's "reasonable structure"); otherwise
   k = 1, no split. Why not the eigengap: on noisy maps of one pattern the kNN graph's
   small eigenvalues are nearly evenly spaced, and the largest gap fell at k = 3 or 4 in
   our planted tests, splitting a class that has one strategy; its silhouettes stay
   around 0.25-0.3 while two real patterns score 0.65-0.72.
4. Strategy centroids are the mean thumbnails of the clusters, ordered by size.

**Clever-Hans score** of a class: with the strategies ordered by size (0 = the majority),
``max_j (1 - cos(c_j, c_0))`` over the minority strategies ``j`` holding at least
``min_share`` of the class's rows; 0 when there is one strategy. Centroids are
non-negative, so the score is in [0, 1]: 0 = the minority looks where the majority looks,
1 = at disjoint pixels. The share floor keeps a handful of outliers from ranking a class
first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_STRATEGIES",
    "Strategies",
    "adjusted_rand_index",
    "assign",
    "clever_hans_score",
    "find_strategies",
    "kmeans",
    "silhouette",
    "spectral_embedding",
]

#: At most this many strategies per class or group.
MAX_STRATEGIES = 5
#: Fewer rows than this are never split (one strategy).
MIN_ROWS = 6
#: Neighbours in the affinity graph.
NEIGHBOURS = 10
#: A split is kept only when its mean silhouette reaches this.
MIN_SILHOUETTE = 0.5


@dataclass
class Strategies:
    """The strategies found on one class's (or group's) thumbnails.

    ``labels[i]`` is row ``i``'s strategy (0 = the largest); ``centroids`` is
    ``k x side x side``; ``silhouette`` is the chosen split's mean silhouette (NaN when
    there is one strategy: the best split's silhouette is in ``best_silhouette``).
    """

    labels: np.ndarray
    centroids: np.ndarray
    silhouette: float
    best_silhouette: float

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie 1985): 1 = identical
    partitions, ~0 = chance agreement. Same values as scikit-learn's."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape} vs {b.shape}")
    n = a.size
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) // 2).sum())

    index = pairs(table)
    sa, sb = pairs(table.sum(1)), pairs(table.sum(0))
    expected = sa * sb / (n * (n - 1) / 2)
    top = (sa + sb) / 2
    if top == expected:  # both labelings are one cluster (or each row its own)
        return 1.0
    return (index - expected) / (top - expected)


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, starts: int = 10, iters: int = 100
           ) -> np.ndarray:  # fmt: skip
    """Labels of k-means with k-means++ seeding; the best of ``starts`` runs (lowest
    within-cluster sum of squares). Deterministic for a given ``seed``."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if k <= 1 or n <= k:
        return np.zeros(n, dtype=np.int64) if k <= 1 else np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    sq = (x**2).sum(1)
    inits = []
    for _ in range(starts):  # k-means++ seeds, all drawn first (the iterations draw nothing)
        centres = [x[rng.integers(n)]]
        d = ((x - centres[0]) ** 2).sum(1)  # each row's distance to its nearest centre
        for _j in range(1, k):
            total = d.sum()
            centres.append(x[rng.choice(n, p=d / total)] if total > 0 else x[rng.integers(n)])
            d = np.minimum(d, ((x - centres[-1]) ** 2).sum(1))
        inits.append(np.stack(centres))
    # Lloyd's iterations for every start at once (starts x k centres): a start that has
    # converged stays put (same labels, same centres), so this is the starts one by one,
    # without ~1,000 small numpy calls per start (most of analyze's clustering time).
    c = np.stack(inits)
    ks = np.arange(k)

    def dist2(c: np.ndarray) -> np.ndarray:
        return sq[None, :, None] - 2 * x @ c.transpose(0, 2, 1) + (c**2).sum(2)[:, None, :]

    labels = np.zeros((starts, n), dtype=np.int64)
    for it in range(iters):
        new = dist2(c).argmin(2)
        if it and np.array_equal(new, labels):
            break
        labels = new
        onehot = (labels[:, :, None] == ks).astype(np.float64)
        size = onehot.sum(1)[:, :, None]
        c = np.where(size > 0, onehot.transpose(0, 2, 1) @ x / np.maximum(size, 1), c)
    cost = dist2(c).min(2).sum(1)
    best, best_cost = np.zeros(n, dtype=np.int64), np.inf
    for i in range(starts):
        if cost[i] < best_cost - 1e-12:
            best, best_cost = labels[i], float(cost[i])
    return best


def _affinity(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d2 = np.maximum((x**2).sum(1)[:, None] - 2 * x @ x.T + (x**2).sum(1)[None, :], 0.0)
    np.fill_diagonal(d2, np.inf)
    nn = min(NEIGHBOURS, n - 1)
    idx = np.argpartition(d2, nn - 1, axis=1)[:, :nn]
    kth = np.take_along_axis(d2, idx, 1).max(1)
    scale = np.sqrt(np.maximum(kth, 1e-12))
    w = np.zeros((n, n))
    rows = np.repeat(np.arange(n), nn)
    cols = idx.ravel()
    w[rows, cols] = np.exp(-d2[rows, cols] / (scale[rows] * scale[cols]))
    return np.maximum(w, w.T)


def spectral_embedding(x: np.ndarray, dims: int) -> np.ndarray:
    """The first ``dims`` eigenvectors (smallest eigenvalues) of the normalised Laplacian
    of the kNN graph of the rows of ``x``; ``n x dims``."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n = x.shape[0]
    w = _affinity(x)
    inv = 1.0 / np.sqrt(np.maximum(w.sum(1), 1e-12))
    lap = np.eye(n) - inv[:, None] * w * inv[None, :]
    # Only the smallest ``dims`` eigenpairs (LAPACK's evx): 3x faster than a full eigh at
    # 500 rows, and 10-70x when BLAS threads compete for busy cores (measured).
    from scipy.linalg import eigh

    _vals, vecs = eigh(lap, subset_by_index=[0, min(dims, n) - 1], driver="evx")
    return vecs[:, :dims]


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of ``labels`` on the rows of ``x`` (Euclidean distances); a row
    alone in its cluster scores 0, as in scikit-learn."""
    return _silhouette(_distances(x), labels)


def _distances(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    d = np.sqrt(np.maximum((x**2).sum(1)[:, None] - 2 * x @ x.T + (x**2).sum(1)[None, :], 0))
    np.fill_diagonal(d, 0.0)
    return d


def _silhouette(d: np.ndarray, labels: np.ndarray) -> float:
    """:func:`silhouette` from the rows' distance matrix (computed once per group, not
    once per candidate k)."""
    labels = np.asarray(labels)
    ks = np.unique(labels)
    if len(ks) < 2:
        return float("nan")
    onehot = labels[:, None] == ks[None, :]
    sums = d @ onehot
    sizes = onehot.sum(0).astype(np.float64)
    own = onehot.argmax(1)
    n_own = sizes[own]
    a = sums[np.arange(len(d)), own] / np.maximum(n_own - 1, 1)
    other = sums / sizes[None, :]
    other[np.arange(len(d)), own] = np.inf
    b = other.min(1)
    s = np.where(n_own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def find_strategies(thumbs: np.ndarray, *, max_k: int = MAX_STRATEGIES, seed: int = 0
                    ) -> Strategies:  # fmt: skip
    """Strategies of one class's thumbnails (``n x side x side``, unit norm): labels
    (0 = the largest strategy), centroids and silhouettes (see the module docstring)."""
    t = np.asarray(thumbs, dtype=np.float64)
    n = t.shape[0]
    x = t.reshape(n, -1)
    labels = np.zeros(n, dtype=np.int64)
    best_sil, chosen = float("nan"), float("nan")
    if n >= MIN_ROWS:
        top = min(max_k, n - 1)
        emb = spectral_embedding(x, top)
        dist = _distances(x)
        for k in range(2, top + 1):
            u = emb[:, :k] / np.maximum(np.linalg.norm(emb[:, :k], axis=1, keepdims=True), 1e-12)
            lab = kmeans(u, k, seed=seed)
            sil = _silhouette(dist, lab)
            if np.isfinite(sil) and not sil <= best_sil:
                best_sil, best_labels = sil, lab
        if best_sil >= MIN_SILHOUETTE:
            labels, chosen = best_labels, best_sil
    k = int(labels.max()) + 1 if n else 0
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    order = order[sizes[order] > 0]
    remap = np.full(max(k, 1), -1, dtype=np.int64)
    remap[order] = np.arange(len(order))
    labels = remap[labels] if n else labels
    centroids = (np.stack([t[labels == j].mean(0) for j in range(len(order))]) if n
                 else np.zeros((0, *t.shape[1:])))  # fmt: skip
    return Strategies(labels=labels, centroids=centroids.astype(np.float32),
                      silhouette=chosen, best_silhouette=best_sil)  # fmt: skip


def assign(thumbs: np.ndarray, group: np.ndarray, centroids: np.ndarray, ks: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Nearest centroid of each thumbnail among its own group's strategies:
    ``(strategy, distance)``. Every row, in the sample the strategies were found on or not,
    is assigned by this one rule. ``centroids`` is ``groups x MAX_STRATEGIES x ...`` of which
    group ``g`` uses the first ``ks[g]``; the rows of all groups go in one batch (a call per
    group and unit was ~640 calls a unit for ImageNet with shuffled classes)."""
    x = np.asarray(thumbs, dtype=np.float64).reshape(len(thumbs), -1)
    c = np.asarray(centroids, dtype=np.float64).reshape(*centroids.shape[:2], -1)
    cc = (c**2).sum(2)
    cc[np.arange(c.shape[1])[None, :] >= np.asarray(ks)[:, None]] = np.inf  # unused slots
    g = np.asarray(group)
    d2 = (x**2).sum(1)[:, None] - 2 * np.einsum("nd,nkd->nk", x, c[g]) + cc[g]
    j = d2.argmin(1)
    return j, np.sqrt(np.maximum(d2[np.arange(len(x)), j], 0.0))


def clever_hans_score(centroids: np.ndarray, sizes: np.ndarray, min_share: float = 0.05
                      ) -> tuple[float, int]:  # fmt: skip
    """``(score, strategy)``: how far the most distant minority strategy (at least
    ``min_share`` of the rows) stands from the majority strategy 0, as ``1 - cos`` of the
    centroids; ``(0.0, -1)`` when there is no such minority."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if len(sizes) < 2 or sizes.sum() <= 0:
        return 0.0, -1
    c = np.asarray(centroids, dtype=np.float64).reshape(len(centroids), -1)
    norms = np.linalg.norm(c, axis=1)
    best, which = 0.0, -1
    major = int(np.argmax(sizes))
    for j in range(len(sizes)):
        if j == major or sizes[j] / sizes.sum() < min_share or norms[j] == 0 or norms[major] == 0:
            continue
        sep = 1.0 - float(c[j] @ c[major] / (norms[j] * norms[major]))
        if sep > best:
            best, which = sep, j
    return max(best, 0.0), which
