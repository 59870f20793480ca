"""``unioncam analyze``: descriptors, per-class tables and strategies for a whole store.

Why it runs the way it does: a store for ImageNet-train holds 1.28 M maps, so the
analysis reads them once, unit by unit (one shard each), and keeps only what a later
step needs: per row a few descriptors and a small thumbnail (written back into the
store's ``analysis`` group, one chunk per unit, so units are independent and can be
described in parallel as Ray tasks when a Ray cluster is connected); per group a bounded
sample of thumbnails to cluster. Memory is bounded by ``groups x sample_per_group``
thumbnails, not by the number of rows.

Steps (layout: :mod:`pipeline.analysis.results`):

1. **describe** every finished unit not described yet: descriptors
   (:mod:`pipeline.analysis.descriptors`) and the thumbnail of every OK row. A row that
   failed in the run (no map) is marked ``NO_MAP``; a row whose map is NaN/inf, flat or
   unreadable is marked ``BAD_MAP``; both are counted and skipped, never a crash. Units
   without a completion marker are not read (a run may still be writing them); the
   attributes say which units the analysis covers (``units``) and whether that is all
   of them (``complete``). A rerun describes only the new units.
2. **tables and strategies** (recomputed whenever step 1 added units or the parameters
   changed; otherwise nothing is done): per class the descriptors' mean and standard
   deviation and the mean map; per group a uniform sample of at most
   ``sample_per_group`` rows (those with the smallest hash of their row id, so the
   sample does not depend on the reading order) is clustered into strategies
   (:mod:`pipeline.analysis.strategies`); then every row of the group is assigned to the
   nearest strategy centroid, and the exemplars (rows nearest each centroid) and the
   most off-object rows (the most mass on the border band) are kept.

The analysis records the store's fingerprints (``manifest_fingerprint``,
``config_fingerprint``, ``created_at``); when they change (the store was overwritten by
another run) it starts over.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.analysis.boxes import LOCALISATION, box_mask, load_boxes, localisation, match_rows
from pipeline.analysis.descriptors import DESCRIPTORS, describe
from pipeline.analysis.groups import AUTO_MIN_ROWS, Grouping, load_grouping
from pipeline.analysis.reader import StoreReader, open_reader
from pipeline.analysis.results import ANALYSIS, DESCRIBED
from pipeline.analysis.strategies import (
    MAX_STRATEGIES,
    assign,
    clever_hans_score,
    find_strategies,
)
from pipeline.data.decode import Status
from pipeline.store.io import open_store
from pipeline.store.lease import StoreLease, refresh_consolidated

IMAGENET_CLASSES = Path(__file__).resolve().parents[1] / "data" / "imagenet_classes.txt"

__all__ = ["AnalysisConfig", "AnalysisSummary", "analyze", "describe_unit"]

#: Bumped when what the analysis computes changes (a stored analysis of another version
#: is recomputed).
ANALYSIS_VERSION = 1


@dataclass(frozen=True)
class AnalysisConfig:
    """Parameters of the analysis (stored in the group's attributes)."""

    #: ``auto``, ``class``, ``imagenet`` or a CSV path (:mod:`pipeline.analysis.groups`).
    groups: str = "auto"
    #: Side of the stored thumbnails (mean maps are shown at this side).
    thumb_side: int = 32
    #: Side the strategies are clustered at (a divisor-free downsampling of the thumbnail).
    cluster_side: int = 16
    #: At most this many rows of a group are clustered (the rest are assigned).
    sample_per_group: int = 500
    #: A minority strategy counts for the Clever-Hans score from this share of rows.
    min_share: float = 0.05
    #: Rows kept per strategy as exemplars, and per group as most off-object.
    exemplars: int = 4
    off_object: int = 8
    seed: int = 0
    #: Object boxes (``LOC_val_solution.csv`` or a generic CSV; :mod:`pipeline.analysis.boxes`).
    boxes: str | None = None

    def key(self) -> dict[str, Any]:
        key = {**asdict(self), "version": ANALYSIS_VERSION}
        if self.boxes:  # the file's content, not only its name, decides
            with open(self.boxes, "rb") as fh:
                key["boxes_sha256"] = hashlib.sha256(fh.read()).hexdigest()
        return key


@dataclass
class AnalysisSummary:
    """What one :func:`analyze` call did and what the analysis now covers."""

    store: str
    units: int
    num_units: int
    rows_described: int
    rows_no_map: int
    rows_bad_map: int
    units_added: int
    recomputed: bool
    groups: int
    grouping: str
    seconds: float
    top_clever_hans: list[tuple[str, float]] = field(default_factory=list)
    #: Whether the units were described as Ray tasks.
    ray_tasks: bool = False
    #: Wall seconds by step: describe, tables (all of step 2), of which clustering.
    timings: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        cover = "all" if self.units == self.num_units else f"{self.units} of {self.num_units}"
        lines = [
            f"analysis of {self.store}: {cover} units ({self.rows_described} rows described; "
            f"skipped {self.rows_no_map} without a map, {self.rows_bad_map} with a bad map)",
            ("recomputed" if self.recomputed else "up to date (nothing recomputed)")
            + f"; {self.units_added} new units; {self.groups} groups ({self.grouping}); "
            f"{self.seconds:.1f} s",
        ]
        if self.units < self.num_units:
            lines.append("the run is not finished: rerun analyze when it is to cover every unit")
        top = [(g, s) for g, s in self.top_clever_hans if s > 0]
        lines.append("Clever-Hans candidates (group: score): " + ", ".join(
            f"{g}: {s:.3f}" for g, s in top) if top else
            "Clever-Hans candidates: none (no group split into strategies)")  # fmt: skip
        return "\n".join(lines)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _source(reader: StoreReader) -> dict[str, Any]:
    """What the analysis was computed from: the store's fingerprints and creation time."""
    a = reader.attrs
    keep = {k: v for k, v in a.items() if k.endswith("fingerprint")}
    keep["created_at"] = a.get("created_at")
    keep["num_rows"] = reader.num_rows
    keep["unit_size"] = reader.unit_size
    return keep


def _create(store: Any, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any,
            fill: Any, dims: tuple[str, ...], attrs: dict[str, Any] | None = None) -> zarr.Array:
    return zarr.create_array(store, name=f"{ANALYSIS}/{name}", shape=shape, chunks=chunks,
                             dtype=dtype, fill_value=fill, dimension_names=dims,
                             attributes=attrs or {}, overwrite=True)  # fmt: skip


def _row_arrays(reader: StoreReader, cfg: AnalysisConfig, store: Any) -> None:
    """Create (empty) the per-row arrays: the driver's job, before any unit is described."""
    n, u = reader.num_rows, reader.unit_size
    side = min(cfg.thumb_side, reader.image_size)
    zarr.open_group(store, path=ANALYSIS, mode="w",
                    attributes={"description": "unioncam analyze: see pipeline/analysis/results.py"})  # fmt: skip
    zarr.open_group(store, path=f"{ANALYSIS}/rows", mode="w")
    for d in DESCRIPTORS:
        _create(store, f"rows/{d}", (n,), (u,), "f4", float("nan"), ("image",))
    _create(store, "rows/described", (n,), (u,), "u1", DESCRIBED["NOT_ANALYSED"], ("image",),
            {"codes": DESCRIBED})  # fmt: skip
    _create(store, "rows/thumbs", (n, side, side), (u, side, side), "f2", float("nan"),
            ("image", "ty", "tx"), {"description": "the map area-averaged to a thumbnail"})
    if cfg.boxes:
        for name in LOCALISATION:
            _create(store, f"rows/{name}", (n,), (u,), "f4", float("nan"), ("image",))
    _create(store, "rows/group", (n,), (u,), "i4", -1, ("image",))
    _create(store, "rows/strategy", (n,), (u,), "i1", -1, ("image",))
    _create(store, "rows/strategy_distance", (n,), (u,), "f4", float("nan"), ("image",))


def _downsample(maps: np.ndarray, side: int) -> np.ndarray:
    """Area-average ``n x H x W`` maps to ``n x side x side`` (NaN where a map is NaN)."""
    m = np.asarray(maps, dtype=np.float32)
    n, h, w = m.shape
    ys = np.searchsorted((np.arange(h) * side) // h, np.arange(side))
    xs = np.searchsorted((np.arange(w) * side) // w, np.arange(side))
    t = np.add.reduceat(np.add.reduceat(m, ys, axis=1), xs, axis=2)
    counts = np.outer(np.diff(np.append(ys, h)), np.diff(np.append(xs, w))).astype(np.float32)
    return t / counts


def _read_maps(reader: StoreReader, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The unit's maps, and which rows could be read; an unreadable shard is retried row
    by row so one bad chunk costs only its rows."""
    arr = reader.group["maps"]
    s = reader.image_size
    try:
        return np.asarray(arr[start:stop], dtype=np.float32), np.ones(stop - start, bool)
    except Exception:  # a corrupt shard: read row by row, count the rows that fail
        out = np.full((stop - start, s, s), np.nan, dtype=np.float32)
        ok = np.zeros(stop - start, bool)
        for i in range(stop - start):
            try:
                out[i] = np.asarray(arr[start + i], dtype=np.float32)
                ok[i] = True
            except Exception:
                pass
        return out, ok


def describe_unit(store_path: str, u: int, thumb_side: int,
                  storage_options: dict[str, Any] | None = None,
                  boxes: list[list[tuple[float, float, float, float]]] | None = None,
                  ) -> dict[str, int]:  # fmt: skip
    """Describe one unit and write its rows of ``analysis/rows`` (whole chunks); with
    ``boxes`` (per row of the unit) also its localisation scores. Returns counts by
    outcome. A plain function so it can run as a Ray task."""
    reader = open_reader(store_path, storage_options)
    start, stop = reader.unit_range(u)
    status = np.asarray(reader.group["status"][start:stop])
    ok = status == int(Status.OK)
    maps, readable = _read_maps(reader, start, stop)
    maps[~ok] = np.nan
    desc, valid = describe(maps)
    valid &= readable & ok
    desc[~valid] = np.nan
    side = min(thumb_side, reader.image_size)
    thumbs = _downsample(np.where(valid[:, None, None], maps, np.nan), side)
    code = np.where(valid, DESCRIBED["DESCRIBED"],
                    np.where(ok, DESCRIBED["BAD_MAP"], DESCRIBED["NO_MAP"])).astype(np.uint8)  # fmt: skip
    store = open_store(store_path, mode="r+", storage_options=storage_options).store
    rows = zarr.open_group(store, path=f"{ANALYSIS}/rows", mode="r+", use_consolidated=False)
    for j, d in enumerate(DESCRIPTORS):
        rows[d][start:stop] = desc[:, j]
    rows["thumbs"][start:stop] = thumbs.astype(np.float16)
    rows["described"][start:stop] = code
    if boxes is not None:
        crop = np.asarray(reader.group["crop_box"][start:stop])
        s = reader.image_size
        masks = np.stack([box_mask(crop[i], boxes[i], s, s) for i in range(stop - start)])
        scored = valid & np.array([len(b) > 0 for b in boxes])
        loc = localisation(maps, masks, scored)
        for j, name in enumerate(LOCALISATION):
            rows[name][start:stop] = loc[:, j]
    return {"described": int(valid.sum()), "no_map": int((~ok).sum()),
            "bad_map": int((ok & ~valid).sum())}  # fmt: skip


def _run_units(store_path: str, units: list[int], cfg: AnalysisConfig,
               storage_options: dict[str, Any] | None, parallel: bool | None,
               done: Callable[[int, dict[str, int]], None]) -> bool:  # fmt: skip
    """Describe ``units``: as Ray tasks when Ray is initialised (and ``parallel`` is not
    False), else one after the other; ``done`` is called after each unit. Returns whether
    Ray tasks did it."""
    use_ray = False
    if parallel is not False:
        try:
            import ray

            use_ray = ray.is_initialized() and len(units) > 1
        except ImportError:
            use_ray = False
    unit_boxes = _boxes_of_units(store_path, units, cfg, storage_options)
    if not use_ray:
        for u in units:
            done(u, describe_unit(store_path, u, cfg.thumb_side, storage_options,
                                  unit_boxes.get(u)))  # fmt: skip
        return False
    import ray

    task = ray.remote(num_cpus=1)(describe_unit)
    pending = {task.remote(store_path, u, cfg.thumb_side, storage_options, unit_boxes.get(u)): u
               for u in units}  # fmt: skip
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            done(pending.pop(ref), ray.get(ref))
    return True


def _boxes_of_units(store_path: str, units: list[int], cfg: AnalysisConfig,
                    storage_options: dict[str, Any] | None) -> dict[int, list]:  # fmt: skip
    """Per unit, per row, the boxes the row is scored against (empty without ``--boxes``);
    rows are matched by the manifest's URIs."""
    if not cfg.boxes or not units:
        return {}
    from pipeline.data.manifest import Manifest

    reader = open_reader(store_path, storage_options)
    uri = reader.attrs.get("manifest")
    if not uri:
        raise ValueError(f"{reader.path} records no manifest: boxes are matched to rows "
                         "through the manifest's URIs")  # fmt: skip
    names = [ln.split("\t", 1)[0] for ln in IMAGENET_CLASSES.read_text().splitlines()
             if ln and not ln.startswith("#")]  # fmt: skip
    boxes = load_boxes(cfg.boxes, names)
    manifest = Manifest.open(uri, storage_options=storage_options)
    out = {}
    for u in units:
        s, e = reader.unit_range(u)
        rows = manifest.get_rows(range(s, e), with_images=False)
        labels = np.asarray(reader.group["label"][s:e]).tolist()
        out[u] = match_rows([r.uri for r in rows], labels, boxes)
    return out


def _choose_grouping(cfg: AnalysisConfig, counts: dict[int, int]) -> tuple[Grouping, str]:
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
    x = _downsample(np.nan_to_num(t.astype(np.float32)), side).reshape(len(t), -1)
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


def _tables(reader: StoreReader, cfg: AnalysisConfig, store: Any,
            timings: dict[str, float]) -> tuple[int, str, list]:  # fmt: skip
    """Step 2: per-class tables, per-group strategies, every row's strategy."""
    rows_g = zarr.open_group(store, path=f"{ANALYSIS}/rows", mode="r+", use_consolidated=False)
    units = sorted(reader.done_units())
    # pass a: classes and counts (scalars only)
    counts: dict[int, int] = {}
    for u in units:
        s, e = reader.unit_range(u)
        ok = np.asarray(rows_g["described"][s:e]) == DESCRIBED["DESCRIBED"]
        t = np.asarray(reader.group["target"][s:e])[ok]
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
        tgt = np.asarray(reader.group["target"][s:e])[idx]
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
        np.add.at(csum, ci, d0)
        np.add.at(csq, ci, d0**2)
        np.add.at(cnum, ci, fin)
        np.add.at(cmap, ci, th)
        np.add.at(gsum, gi, d0[:, : len(DESCRIPTORS)])
        np.add.at(gmap, gi, th)
        np.add.at(gcount, gi, 1)
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
                np.add.at(sizes[g], j, 1)
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
    a = _create(store, "classes/class", (ncl,), (ncl1,), "i4", -1, ("class",))
    a[:] = np.asarray(classes, dtype=np.int32)
    a = _create(store, "classes/group", (ncl,), (ncl1,), "i4", -1, ("class",))
    a[:] = class_group.astype(np.int32)
    a = _create(store, "classes/count", (ncl,), (ncl1,), "i8", 0, ("class",))
    a[:] = ccount.astype(np.int64)
    for j, d in enumerate((*DESCRIPTORS, *loc)):
        _create(store, f"classes/{d}_mean", (ncl,), (ncl1,), "f4", float("nan"),
                ("class",))[:] = cmean[:, j].astype(np.float32)  # fmt: skip
        _create(store, f"classes/{d}_std", (ncl,), (ncl1,), "f4", float("nan"),
                ("class",))[:] = cstd[:, j].astype(np.float32)  # fmt: skip
    _create(store, "classes/mean_map", (ncl, side, side), (ncl1, side, side), "f4",
            float("nan"), ("class", "ty", "tx"))[:] = (cmap / np.maximum(ccount, 1)[:, None, None]
                                                       ).astype(np.float32)  # fmt: skip
    zarr.open_group(store, path=f"{ANALYSIS}/groups", mode="w")
    ng1 = max(ng, 1)
    gname = _create(store, "groups/group", (ng,), (ng1,), str, "", ("group",))
    gname[:] = np.array(names, dtype=object)
    _create(store, "groups/count", (ng,), (ng1,), "i8", 0, ("group",))[:] = gcount
    _create(store, "groups/k", (ng,), (ng1,), "i1", 0, ("group",))[:] = ks.astype(np.int8)
    _create(store, "groups/silhouette", (ng,), (ng1,), "f4", float("nan"), ("group",),
            {"description": "mean silhouette of the chosen split; NaN = not split"}
            )[:] = sil.astype(np.float32)  # fmt: skip
    chs = np.zeros(ng, dtype=np.float32)
    chj = np.full(ng, -1, dtype=np.int8)
    for g in range(ng):
        chs[g], chj[g] = clever_hans_score(centroids[g, : ks[g]], sizes[g, : ks[g]],
                                           cfg.min_share)  # fmt: skip
    _create(store, "groups/clever_hans", (ng,), (ng1,), "f4", float("nan"), ("group",),
            {"description": "1 - cos(minority centroid, majority centroid), max over "
                            f"minorities with >= {cfg.min_share:g} of the rows"})[:] = chs
    _create(store, "groups/clever_hans_strategy", (ng,), (ng1,), "i1", -1, ("group",))[:] = chj
    _create(store, "groups/sizes", (ng, kmax), (ng1, kmax), "i8", 0, ("group", "strategy"),
            )[:] = sizes  # fmt: skip
    _create(store, "groups/centroids", (ng, kmax, cs, cs), (ng1, kmax, cs, cs), "f4", 0.0,
            ("group", "strategy", "cy", "cx"))[:] = centroids  # fmt: skip
    ex = np.full((ng, kmax, cfg.exemplars), -1, dtype=np.int64)
    for g in range(ng):
        for j in range(kmax):
            r = exemplars[g][j].rows
            ex[g, j, : len(r)] = r
    _create(store, "groups/exemplars", ex.shape, (ng1, kmax, cfg.exemplars), "i8", -1,
            ("group", "strategy", "exemplar"))[:] = ex  # fmt: skip
    of = np.full((ng, cfg.off_object), -1, dtype=np.int64)
    for g in range(ng):
        of[g, : len(off[g].rows)] = off[g].rows
    _create(store, "groups/off_object", of.shape, (ng1, cfg.off_object), "i8", -1,
            ("group", "rank"), {"description": "rows with the most mass on the border band"}
            )[:] = of  # fmt: skip
    _create(store, "groups/mean_map", (ng, side, side), (ng1, side, side), "f4", float("nan"),
            ("group", "ty", "tx"))[:] = (gmap / np.maximum(gcount, 1)[:, None, None]
                                         ).astype(np.float32)  # fmt: skip
    for j, d in enumerate(DESCRIPTORS):
        _create(store, f"groups/{d}_mean", (ng,), (ng1,), "f4", float("nan"), ("group",)
                )[:] = gmean[:, j].astype(np.float32)  # fmt: skip
    ranking = sorted(zip(names, chs.tolist(), strict=True), key=lambda t: (-t[1], t[0]))
    return ng, grouping_name, ranking


def analyze(
    store: str,
    *,
    config: AnalysisConfig | None = None,
    compare: str | None = None,
    compare_maps: tuple[str, str] = ("maps", "maps"),
    storage_options: dict[str, Any] | None = None,
    parallel: bool | None = None,
    force: bool = False,
) -> AnalysisSummary:
    """Analyse a store (see the module docstring); ``compare`` another store over the same
    manifest (or the same store with two ``compare_maps``, e.g. ``("maps",
    "methods/gradcam")``). Returns what was done. Resumable: a rerun describes
    only new units and recomputes the tables only when something changed.

    A writer like ``run``: it holds the store's lease while it writes (a running driver
    refuses it, and it refuses a driver, with one line), and consolidates the metadata
    after writing, so ``analysis/*`` opens with plain ``xr.open_zarr(path, group=...)``.
    """
    lease = StoreLease(store, storage_options, holder="unioncam analyze")
    lease.acquire()
    try:
        summary = _analyze(store, config=config, compare=compare, compare_maps=compare_maps,
                           storage_options=storage_options, parallel=parallel, force=force)
        refresh_consolidated(store, storage_options)
        return summary
    finally:
        lease.release()


def _analyze(
    store: str,
    *,
    config: AnalysisConfig | None = None,
    compare: str | None = None,
    compare_maps: tuple[str, str] = ("maps", "maps"),
    storage_options: dict[str, Any] | None = None,
    parallel: bool | None = None,
    force: bool = False,
) -> AnalysisSummary:
    cfg = config or AnalysisConfig()
    t0 = time.perf_counter()
    reader = open_reader(store, storage_options)
    zstore = open_store(store, mode="r+", storage_options=storage_options).store
    try:
        old = dict(zarr.open_group(zstore, path=ANALYSIS, mode="r", use_consolidated=False).attrs)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        old = {}
    source = _source(reader)
    params = cfg.key()
    if force or old.get("source") != _plain(source) or old.get("params") != _plain(params):
        _row_arrays(reader, cfg, zstore)
        old = {}
    group = zarr.open_group(zstore, path=ANALYSIS, mode="r+", use_consolidated=False)
    described = set(old.get("units") or [])
    counts = dict(old.get("counts") or {"described": 0, "no_map": 0, "bad_map": 0})
    todo = sorted(reader.done_units() - described)

    def done(u: int, c: dict[str, int]) -> None:
        described.add(u)
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
        group.update_attributes({"units": sorted(described), "counts": counts})

    group.update_attributes({"source": source, "params": params})
    timings: dict[str, float] = {}
    t1 = time.perf_counter()
    used_ray = _run_units(store, todo, cfg, storage_options, parallel, done)
    timings["describe"] = time.perf_counter() - t1
    recomputed = bool(todo) or not old.get("tables_done")
    ng, gname = old.get("groups", 0), old.get("grouping", "")
    ranking = old.get("top_clever_hans") or []
    if recomputed:
        group.update_attributes({"tables_done": False})
        t2 = time.perf_counter()
        ng, gname, full = _tables(reader, cfg, zstore, timings)
        timings["tables"] = time.perf_counter() - t2
        ranking = [[g, round(float(s), 4)] for g, s in full[:5]]
        group.update_attributes({"tables_done": True, "groups": ng, "grouping": gname,
                                 "top_clever_hans": ranking, "computed_at": _now(),
                                 "complete": len(described) == reader.num_units})  # fmt: skip
    if compare is not None:
        from pipeline.analysis.compare import compare_stores

        compare_stores(reader, compare, maps=compare_maps, store=zstore,
                       storage_options=storage_options)  # fmt: skip
    return AnalysisSummary(
        store=reader.path, units=len(described), num_units=reader.num_units,
        rows_described=counts.get("described", 0), rows_no_map=counts.get("no_map", 0),
        rows_bad_map=counts.get("bad_map", 0), units_added=len(todo), recomputed=recomputed,
        groups=int(ng), grouping=str(gname),
        seconds=time.perf_counter() - t0,
        top_clever_hans=[(str(g), float(s)) for g, s in ranking], ray_tasks=used_ray,
        timings=timings,
    )  # fmt: skip


def _plain(d: Any) -> Any:
    """JSON round trip: what the attributes give back for ``d``."""
    return json.loads(json.dumps(d, default=str))
