"""``unioncam analyze``, step 2: per-class tables, per-group strategies, every row's strategy.

Why apart from step 1 (:mod:`pipeline.analysis.store_analysis`): describing is per unit
and parallel; this step reads every described row's scalars in whole columns (sums, counts, the
per-group sample, exemplars: vectorised over all groups at once, never a loop over the
groups of a unit), then two passes over the units' thumbnails (mean maps and the sample;
assignment of every row) around the clustering (Ray tasks over the groups when Ray is up).
Memory: ~120 bytes of scalars a row plus ``groups x sample_per_group`` thumbnails.
Per-group sums are one sort and ``np.add.reduceat`` (:func:`_group_add`), not
``np.add.at``.
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

__all__ = ["cluster_samples", "write_tables"]


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


def _rank_in_group(sorted_keys: np.ndarray) -> np.ndarray:
    """Each element's position in its run of equal keys (``sorted_keys`` sorted): with one
    lexsort by (group, key, row) this is a bottom-k for every group at once, where a merge
    per group and unit was 1.25 M small sorts for ImageNet with every class in every unit."""
    n = len(sorted_keys)
    if not n:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))


def cluster_samples(samples: list[np.ndarray], cs: int,
                    seed: int) -> list[tuple[int, np.ndarray, float]]:  # fmt: skip
    """``(k, centroids, silhouette)`` of each group's sample (rows of ``cs * cs`` float16
    thumbnails): one Ray task's work, or the whole of it in one process."""
    out = []
    for x in samples:
        st = find_strategies(x.astype(np.float32).reshape(len(x), cs, cs), seed=seed)
        out.append((st.k, st.centroids, st.silhouette))
    return out


def _cluster(samples: list[np.ndarray], cs: int, seed: int,
             use_ray: bool) -> list[tuple[int, np.ndarray, float]]:  # fmt: skip
    """:func:`cluster_samples` of every group, in batches of groups as Ray tasks when
    ``use_ray`` (it was 186 of analyze's 619 s on ImageNet's 1,000 classes in one process).
    Same results either way: each group's k-means is seeded by ``seed`` alone."""
    if not use_ray or len(samples) < 2:
        return cluster_samples(samples, cs, seed)
    import ray

    # ~4 batches per CPU, as the describe step: a slow node still balances
    per = max(1, -(-len(samples) // (4 * max(1, int(ray.cluster_resources().get("CPU", 1))))))
    task = ray.remote(num_cpus=1)(cluster_samples)
    refs = [task.remote(samples[i : i + per], cs, seed) for i in range(0, len(samples), per)]
    return [r for batch in ray.get(refs) for r in batch]


def write_tables(reader: StoreReader, cfg: Any, store: Any, timings: dict[str, float],
                 use_ray: bool = False) -> tuple[int, str, list]:  # fmt: skip
    """Step 2: per-class tables, per-group strategies, every row's strategy, written into
    the ``analysis`` group of ``store``. ``cfg``: the run's ``AnalysisConfig`` (typed as
    ``Any``: its module imports this one). ``use_ray``: cluster the groups as Ray tasks."""
    group = zarr.open_group(store, path=f"{ANALYSIS}/rows", mode="r+", use_consolidated=False)
    rows_g = {k: group[k] for k in group.array_keys()}  # opened once, not per unit
    # pass a: every described row's scalars in whole-column reads (O(rows) scalars, ~120 B
    # a row: ~150 MB for ImageNet train; thumbnails stay per unit)
    done_rows, cols = reader.read_columns(["target"])
    full = len(done_rows) == reader.num_rows

    def column(a: Any) -> np.ndarray:
        c = np.asarray(a[:])
        return c if full else c[done_rows]

    ok = column(rows_g["described"]) == DESCRIBED["DESCRIBED"]
    loc = tuple(n for n in LOCALISATION if n in rows_g)  # with --boxes
    desc = np.stack([column(rows_g[d])[ok] for d in (*DESCRIPTORS, *loc)], 1).astype(np.float64)
    rows, tgt = done_rows[ok], cols["target"][ok]
    classes_arr, class_counts = np.unique(tgt, return_counts=True)
    counts = {int(c): int(n) for c, n in zip(classes_arr, class_counts, strict=True)}
    grouping, grouping_name = _choose_grouping(cfg, counts)
    classes = [int(c) for c in classes_arr]
    names = grouping.names(classes)
    gidx = {g: i for i, g in enumerate(names)}
    class_group = np.array([gidx[grouping.group_of(c)] for c in classes], dtype=np.int64)
    ci = np.searchsorted(classes_arr, tgt)
    gi = class_group[ci]
    nd, side = len(DESCRIPTORS) + len(loc), rows_g["thumbs"].shape[1]
    cs = min(cfg.cluster_side, side)
    ncl, ng, kmax = len(classes), len(names), MAX_STRATEGIES
    fin = np.isfinite(desc)  # localisation is NaN for rows without a box
    d0 = np.where(fin, desc, 0.0)
    csum, csq, cnum = np.zeros((ncl, nd)), np.zeros((ncl, nd)), np.zeros((ncl, nd))
    _group_add(csum, ci, d0)
    _group_add(csq, ci, d0**2)
    _group_add(cnum, ci, fin)
    gsum, gcount = np.zeros((ng, len(DESCRIPTORS))), np.bincount(gi, minlength=ng)
    _group_add(gsum, gi, d0[:, : len(DESCRIPTORS)])
    ccount = class_counts.astype(np.int64)
    del d0, fin
    # The per-group sample: the rows with the smallest hash of their row id, chosen for
    # all groups at once (one lexsort), in the order the strategies are found on.
    order = np.lexsort((rows, _hash_rank(rows, cfg.seed).astype(np.float64), gi))
    pick = order[_rank_in_group(gi[order]) < cfg.sample_per_group]
    slot = np.full(len(rows), -1, dtype=np.int64)
    slot[pick] = np.arange(len(pick))
    sample_x = np.zeros((len(pick), cs * cs), dtype=np.float16)
    sample_start = np.searchsorted(gi[pick], np.arange(ng + 1))
    del order
    units = sorted(reader.done_units())
    thumbs = rows_g["thumbs"]

    def unit_thumbs(u: int) -> tuple[int, int, int, int, np.ndarray | None]:
        """The unit's row span, its described rows' positions in ``rows`` and thumbnails."""
        s, e = reader.unit_range(u)
        lo, hi = np.searchsorted(rows, [s, e])
        th = np.asarray(thumbs[s:e])[rows[lo:hi] - s].astype(np.float32) if hi > lo else None
        return s, e, lo, hi, th

    # pass b: mean maps and the sample's thumbnails
    cmap, gmap = np.zeros((ncl, side, side)), np.zeros((ng, side, side))
    for u in units:
        s, e, lo, hi, th = unit_thumbs(u)
        if th is None:
            continue
        _group_add(cmap, ci[lo:hi], th)
        _group_add(gmap, gi[lo:hi], th)
        mine = np.nonzero(slot[lo:hi] >= 0)[0]
        if len(mine):
            sample_x[slot[lo:hi][mine]] = _unit_norm(th[mine], cs).astype(np.float16)
    # clustering: each group's sample on its own, as Ray tasks when Ray is up
    t_cluster = time.perf_counter()
    centroids = np.zeros((ng, kmax, cs, cs), dtype=np.float32)
    ks = np.zeros(ng, dtype=np.int64)
    sil = np.full(ng, np.nan)
    todo = [g for g in range(ng) if sample_start[g + 1] > sample_start[g]]
    samples = [sample_x[sample_start[g] : sample_start[g + 1]] for g in todo]
    for g, (k, c, si) in zip(todo, _cluster(samples, cs, cfg.seed, use_ray), strict=True):
        ks[g], centroids[g, :k], sil[g] = k, c, si
    timings["clustering"] = time.perf_counter() - t_cluster
    del sample_x
    # pass c: every row to its group's nearest centroid (all groups of a unit at once)
    strat_all = np.zeros(len(rows), dtype=np.int64)
    dist_all = np.zeros(len(rows))
    for u in units:
        s, e, lo, hi, th = unit_thumbs(u)
        grp = np.full(e - s, -1, dtype=np.int32)
        strat = np.full(e - s, -1, dtype=np.int8)
        dist = np.full(e - s, np.nan, dtype=np.float32)
        if th is not None:
            g = gi[lo:hi]
            j, d = assign(_unit_norm(th, cs), g, centroids, ks)
            strat_all[lo:hi], dist_all[lo:hi] = j, d
            at = rows[lo:hi] - s
            grp[at], strat[at], dist[at] = g, j, d
        rows_g["group"][s:e] = grp
        rows_g["strategy"][s:e] = strat
        rows_g["strategy_distance"][s:e] = dist
    sizes = np.bincount(gi * kmax + strat_all, minlength=ng * kmax).reshape(ng, kmax)
    # exemplars (nearest each centroid) and the most off-object rows: one lexsort each
    ex = np.full((ng, kmax, cfg.exemplars), -1, dtype=np.int64)
    key = gi * kmax + strat_all
    order = np.lexsort((rows, dist_all, key))
    r = _rank_in_group(key[order])
    keep = r < cfg.exemplars
    o = order[keep]
    ex[gi[o], strat_all[o], r[keep]] = rows[o]
    # most off-object: least energy in the boxes when scored, else most border
    off_key = -desc[:, DESCRIPTORS.index("border")]
    if loc:
        e_in = desc[:, len(DESCRIPTORS)]
        off_key = np.where(np.isfinite(e_in), e_in - 1.0, off_key)
    of = np.full((ng, cfg.off_object), -1, dtype=np.int64)
    order = np.lexsort((rows, off_key, gi))
    r = _rank_in_group(gi[order])
    keep = r < cfg.off_object
    of[gi[order[keep]], r[keep]] = rows[order[keep]]
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
    create_array(store, "groups/exemplars", ex.shape, (ng1, kmax, cfg.exemplars), "i8", -1,
            ("group", "strategy", "exemplar"))[:] = ex  # fmt: skip
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


