"""``unioncam analyze``, step 2: per-class tables, per-group strategies, every row's strategy.

Why apart from step 1 (:mod:`pipeline.analysis.store_analysis`): describing is per unit
and parallel; this step is three sequential passes over the described rows (counts; sums,
mean maps and a bounded per-group sample; assignment of every row) plus the clustering,
all with memory bounded by ``groups x sample_per_group`` thumbnails. Per-group sums are
one sort and ``np.add.reduceat`` per unit (:func:`_group_add`), not ``np.add.at``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import zarr

from pipeline.analysis.boxes import LOCALISATION
from pipeline.analysis.descriptors import DESCRIPTORS, downsample
from pipeline.analysis.groups import AUTO_MIN_ROWS, Grouping, load_grouping
from pipeline.analysis.reader import StoreReader
from pipeline.analysis.results import ANALYSIS, DESCRIBED, create_array
from pipeline.analysis.strategies import MAX_STRATEGIES, assign, clever_hans_score, find_strategies

__all__ = ["write_tables"]


def _group_add(out: np.ndarray, idx: np.ndarray, values: np.ndarray) -> None:
    """``out[idx[i]] += values[i]`` for every ``i`` (repeated indices summed), as one sort and
    one ``np.add.reduceat``: ``np.add.at`` is unbuffered and ~20x slower on a unit's rows."""
    if not len(idx):
        return
    order = np.argsort(idx, kind="stable")
    si = idx[order]
    starts = np.flatnonzero(np.r_[True, si[1:] != si[:-1]])
    out[si[starts]] += np.add.reduceat(np.asarray(values, dtype=out.dtype)[order], starts,
                                       axis=0)  # fmt: skip


def _choose_grouping(cfg: Any, counts: dict[int, int]) -> tuple[Grouping, str]:
    if cfg.groups != "auto":
        g = load_grouping(cfg.groups)
        return g, g.source
    median = float(np.median(list(counts.values()))) if counts else 0.0
    if median >= AUTO_MIN_ROWS:
        return load_grouping("class"), f"class (auto: median {median:g} rows per class)"
    return load_grouping("imagenet"), (f"imagenet (auto: median {median:g} rows per class "
                                       f"< {AUTO_MIN_ROWS})")  # fmt: skip


def _hash_rank(rows: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random but order-independent rank of each row id (splitmix64)."""
    z = (rows.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) & \
        np.uint64(0xFFFFFFFFFFFFFFFF)  # fmt: skip
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _unit_norm(t: np.ndarray, side: int) -> np.ndarray:
    """Thumbnails to the clustering side, unit L2 norm (what strategies compare)."""
    x = downsample(np.nan_to_num(t.astype(np.float32)), side).reshape(len(t), -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norm > 0, x / np.maximum(norm, 1e-12), 0.0)


class _TopK:
    """The ``k`` (key, row[, payload]) with the smallest keys, merged unit by unit."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.keys = np.zeros(0)
        self.rows = np.zeros(0, dtype=np.int64)
        self.payload: np.ndarray | None = None

    def add(self, keys: np.ndarray, rows: np.ndarray, payload: np.ndarray | None = None) -> None:
        keys = np.concatenate([self.keys, keys])
        rows = np.concatenate([self.rows, rows])
        order = np.lexsort((rows, keys))[: self.k]
        self.keys, self.rows = keys[order], rows[order]
        if payload is not None:
            both = payload if self.payload is None else np.concatenate([self.payload, payload])
            self.payload = both[order]


def write_tables(reader: StoreReader, cfg: Any, store: Any,
                 timings: dict[str, float]) -> tuple[int, str, list]:  # fmt: skip
    """Step 2: per-class tables, per-group strategies, every row's strategy, written into
    the ``analysis`` group of ``store``. ``cfg``: the run's ``AnalysisConfig`` (typed as
    ``Any``: its module imports this one)."""
    group = zarr.open_group(store, path=f"{ANALYSIS}/rows", mode="r+", use_consolidated=False)
    rows_g = {k: group[k] for k in group.array_keys()}  # opened once, not per unit
    target_arr = reader.group["target"]
    units = sorted(reader.done_units())
    # pass a: classes and counts (scalars only)
    counts: dict[int, int] = {}
    for u in units:
        s, e = reader.unit_range(u)
        ok = np.asarray(rows_g["described"][s:e]) == DESCRIBED["DESCRIBED"]
        t = np.asarray(target_arr[s:e])[ok]
        for c, n in zip(*np.unique(t, return_counts=True), strict=True):
            counts[int(c)] = counts.get(int(c), 0) + int(n)
    grouping, grouping_name = _choose_grouping(cfg, counts)
    classes = sorted(counts)
    cidx = {c: i for i, c in enumerate(classes)}
    names = grouping.names(classes)
    gidx = {g: i for i, g in enumerate(names)}
    class_group = np.array([gidx[grouping.group_of(c)] for c in classes], dtype=np.int64)
    loc = tuple(n for n in LOCALISATION if n in rows_g)  # with --boxes
    nd, side, cs = len(DESCRIPTORS) + len(loc), rows_g["thumbs"].shape[1], min(cfg.cluster_side,
                                                                   rows_g["thumbs"].shape[1])
    ncl, ng = len(classes), len(names)
    csum, csq, cnum = np.zeros((ncl, nd)), np.zeros((ncl, nd)), np.zeros((ncl, nd))
    cmap = np.zeros((ncl, side, side))
    gsum, gmap = np.zeros((ng, len(DESCRIPTORS))), np.zeros((ng, side, side))
    gcount = np.zeros(ng, dtype=np.int64)
    # the sample keeps unit-norm thumbnails at the clustering side, float16 (bounded memory)
    sample: list[_TopK] = [_TopK(cfg.sample_per_group) for _ in range(ng)]

    def unit_arrays(u: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        s, e = reader.unit_range(u)
        ok = np.asarray(rows_g["described"][s:e]) == DESCRIBED["DESCRIBED"]
        idx = np.nonzero(ok)[0]
        tgt = np.asarray(target_arr[s:e])[idx]
        desc = np.stack([np.asarray(rows_g[d][s:e])[idx] for d in (*DESCRIPTORS, *loc)], 1)
        th = np.asarray(rows_g["thumbs"][s:e])[idx].astype(np.float32)
        return s, idx, tgt, desc.astype(np.float64), th

    # pass b: sums, mean maps, the per-group sample (bottom-k of a row hash)
    for u in units:
        s, idx, tgt, desc, th = unit_arrays(u)
        if not len(idx):
            continue
        ci = np.array([cidx[int(c)] for c in tgt])
        gi = class_group[ci]
        fin = np.isfinite(desc)  # localisation is NaN for rows without a box
        d0 = np.where(fin, desc, 0.0)
        _group_add(csum, ci, d0)
        _group_add(csq, ci, d0**2)
        _group_add(cnum, ci, fin)
        _group_add(cmap, ci, th)
        _group_add(gsum, gi, d0[:, : len(DESCRIPTORS)])
        _group_add(gmap, gi, th)
        _group_add(gcount, gi, np.ones(len(gi), np.int64))
        rid = s + idx
        rank = _hash_rank(rid, cfg.seed).astype(np.float64)
        x = _unit_norm(th, cs).astype(np.float16)
        for g in np.unique(gi).tolist():
            m = gi == g
            sample[g].add(rank[m], rid[m], x[m])
    ccount = np.bincount([cidx[c] for c in classes], weights=[counts[c] for c in classes],
                         minlength=ncl) if ncl else np.zeros(0)  # fmt: skip
    # clustering
    t_cluster = time.perf_counter()
    kmax = MAX_STRATEGIES
    centroids = np.zeros((ng, kmax, cs, cs), dtype=np.float32)
    ks = np.zeros(ng, dtype=np.int64)
    sil = np.full(ng, np.nan)
    for g in range(ng):
        ids = sample[g].rows
        if not len(ids) or sample[g].payload is None:
            continue
        x = sample[g].payload.astype(np.float32)
        st = find_strategies(x.reshape(len(ids), cs, cs), seed=cfg.seed)
        ks[g] = st.k
        centroids[g, : st.k] = st.centroids
        sil[g] = st.silhouette
    timings["clustering"] = time.perf_counter() - t_cluster
    # pass c: assign every row, exemplars, off-object rows
    sizes = np.zeros((ng, kmax), dtype=np.int64)
    exemplars = [[_TopK(cfg.exemplars) for _ in range(kmax)] for _ in range(ng)]
    off = [_TopK(cfg.off_object) for _ in range(ng)]
    bi = DESCRIPTORS.index("border")
    for u in units:
        s, e = reader.unit_range(u)
        s, idx, tgt, desc, th = unit_arrays(u)
        grp = np.full(e - s, -1, dtype=np.int32)
        strat = np.full(e - s, -1, dtype=np.int8)
        dist = np.full(e - s, np.nan, dtype=np.float32)
        if len(idx):
            gi = class_group[np.array([cidx[int(c)] for c in tgt])]
            x = _unit_norm(th, cs)
            for g in np.unique(gi).tolist():
                m = np.nonzero(gi == g)[0]
                j, d = assign(x[m], centroids[g, : ks[g]])
                grp[idx[m]], strat[idx[m]], dist[idx[m]] = g, j, d
                sizes[g] += np.bincount(j, minlength=kmax)[:kmax]
                for jj in range(ks[g]):
                    sel = j == jj
                    exemplars[g][jj].add(d[sel], s + idx[m][sel])
                # most off-object: least energy in the boxes when scored, else most border
                key = -desc[m, bi]
                if loc:
                    e_in = desc[m, len(DESCRIPTORS)]
                    key = np.where(np.isfinite(e_in), e_in - 1.0, key)
                off[g].add(key, s + idx[m])
        rows_g["group"][s:e] = grp
        rows_g["strategy"][s:e] = strat
        rows_g["strategy_distance"][s:e] = dist
    # write the tables
    with np.errstate(invalid="ignore", divide="ignore"):
        cn = np.maximum(cnum, 1)
        cmean = csum / cn
        cstd = np.sqrt(np.maximum(csq / cn - cmean**2, 0.0))
        gmean = gsum / np.maximum(gcount, 1)[:, None]
    cmean[cnum == 0], cstd[cnum == 0] = np.nan, np.nan
    gmean[gcount == 0] = np.nan
    zarr.open_group(store, path=f"{ANALYSIS}/classes", mode="w")
    ncl1 = max(ncl, 1)
    a = create_array(store, "classes/class", (ncl,), (ncl1,), "i4", -1, ("class",))
    a[:] = np.asarray(classes, dtype=np.int32)
    a = create_array(store, "classes/group", (ncl,), (ncl1,), "i4", -1, ("class",))
    a[:] = class_group.astype(np.int32)
    a = create_array(store, "classes/count", (ncl,), (ncl1,), "i8", 0, ("class",))
    a[:] = ccount.astype(np.int64)
    for j, d in enumerate((*DESCRIPTORS, *loc)):
        create_array(store, f"classes/{d}_mean", (ncl,), (ncl1,), "f4", float("nan"),
                ("class",))[:] = cmean[:, j].astype(np.float32)  # fmt: skip
        create_array(store, f"classes/{d}_std", (ncl,), (ncl1,), "f4", float("nan"),
                ("class",))[:] = cstd[:, j].astype(np.float32)  # fmt: skip
    create_array(store, "classes/mean_map", (ncl, side, side), (ncl1, side, side), "f4",
            float("nan"), ("class", "ty", "tx"))[:] = (cmap / np.maximum(ccount, 1)[:, None, None]
                                                       ).astype(np.float32)  # fmt: skip
    zarr.open_group(store, path=f"{ANALYSIS}/groups", mode="w")
    ng1 = max(ng, 1)
    gname = create_array(store, "groups/group", (ng,), (ng1,), str, "", ("group",))
    gname[:] = np.array(names, dtype=object)
    create_array(store, "groups/count", (ng,), (ng1,), "i8", 0, ("group",))[:] = gcount
    create_array(store, "groups/k", (ng,), (ng1,), "i1", 0, ("group",))[:] = ks.astype(np.int8)
    create_array(store, "groups/silhouette", (ng,), (ng1,), "f4", float("nan"), ("group",),
            {"description": "mean silhouette of the chosen split; NaN = not split"}
            )[:] = sil.astype(np.float32)  # fmt: skip
    chs = np.zeros(ng, dtype=np.float32)
    chj = np.full(ng, -1, dtype=np.int8)
    for g in range(ng):
        chs[g], chj[g] = clever_hans_score(centroids[g, : ks[g]], sizes[g, : ks[g]],
                                           cfg.min_share)  # fmt: skip
    create_array(store, "groups/clever_hans", (ng,), (ng1,), "f4", float("nan"), ("group",),
            {"description": "1 - cos(minority centroid, majority centroid), max over "
                            f"minorities with >= {cfg.min_share:g} of the rows"})[:] = chs
    create_array(store, "groups/clever_hans_strategy", (ng,), (ng1,), "i1", -1, ("group",))[:] = chj
    create_array(store, "groups/sizes", (ng, kmax), (ng1, kmax), "i8", 0, ("group", "strategy"),
            )[:] = sizes  # fmt: skip
    create_array(store, "groups/centroids", (ng, kmax, cs, cs), (ng1, kmax, cs, cs), "f4", 0.0,
            ("group", "strategy", "cy", "cx"))[:] = centroids  # fmt: skip
    ex = np.full((ng, kmax, cfg.exemplars), -1, dtype=np.int64)
    for g in range(ng):
        for j in range(kmax):
            r = exemplars[g][j].rows
            ex[g, j, : len(r)] = r
    create_array(store, "groups/exemplars", ex.shape, (ng1, kmax, cfg.exemplars), "i8", -1,
            ("group", "strategy", "exemplar"))[:] = ex  # fmt: skip
    of = np.full((ng, cfg.off_object), -1, dtype=np.int64)
    for g in range(ng):
        of[g, : len(off[g].rows)] = off[g].rows
    create_array(store, "groups/off_object", of.shape, (ng1, cfg.off_object), "i8", -1,
            ("group", "rank"), {"description": "rows with the most mass on the border band"}
            )[:] = of  # fmt: skip
    create_array(store, "groups/mean_map", (ng, side, side), (ng1, side, side), "f4", float("nan"),
            ("group", "ty", "tx"))[:] = (gmap / np.maximum(gcount, 1)[:, None, None]
                                         ).astype(np.float32)  # fmt: skip
    for j, d in enumerate(DESCRIPTORS):
        create_array(store, f"groups/{d}_mean", (ng,), (ng1,), "f4", float("nan"), ("group",)
                )[:] = gmean[:, j].astype(np.float32)  # fmt: skip
    ranking = sorted(zip(names, chs.tolist(), strict=True), key=lambda t: (-t[1], t[0]))
    return ng, grouping_name, ranking


