"""Compare the maps of two stores over the same manifest (two models), or two map arrays
of one store (two methods: ``maps`` and ``methods/<name>`` or ``components/<member>``).

Why these two numbers: the rank correlation says whether two maps order the pixels the
same way (insensitive to how each method scales its values), the IoU of the top 15 %
whether they agree on the region that matters; together they separate "same region,
different detail" from "looks elsewhere".

Per row, on the rows that are OK with a valid map in both (others are NaN):

* ``spearman``: Spearman's rank correlation of the two maps' pixels (average ranks for
  ties; 1 = same order). Maps of different sizes are first area-averaged to the smaller.
* ``top_iou``: the IoU of the two maps' top 15 % pixels, each the ``ceil(0.15 * H * W)``
  highest pixels, ties broken by pixel index (row-major).

Per class (the class explained in the first store): the mean of each over its compared
rows. The classes where the two differ most are those with the lowest mean ``spearman``.
Results are written to ``analysis/compare`` with the other store's path, fingerprints
and units in the attributes; a rerun recomputes them only when those (or either store's
finished units) changed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import zarr

from pipeline.analysis.reader import StoreReader, open_reader
from pipeline.analysis.results import ANALYSIS
from pipeline.data.decode import Status

__all__ = ["TOP_SHARE", "compare_maps", "compare_stores"]

#: The share of pixels whose overlap ``top_iou`` measures.
TOP_SHARE = 0.15


def _area(m: np.ndarray, side: int) -> np.ndarray:
    n, h, w = m.shape
    if h == side and w == side:
        return m
    ys = np.searchsorted((np.arange(h) * side) // h, np.arange(side))
    xs = np.searchsorted((np.arange(w) * side) // w, np.arange(side))
    t = np.add.reduceat(np.add.reduceat(m, ys, axis=1), xs, axis=2)
    return t / np.outer(np.diff(np.append(ys, h)), np.diff(np.append(xs, w)))


def compare_maps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(spearman, top_iou)`` per row of two batches of maps (``n x H x W``, sizes may
    differ); NaN where either map is not finite everywhere or is constant."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    side = min(a.shape[1], b.shape[1])
    a, b = _area(a, side).reshape(len(a), -1), _area(b, side).reshape(len(b), -1)
    n, p = a.shape
    rho = np.full(n, np.nan)
    iou = np.full(n, np.nan)
    ok = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    ok &= (a.max(1) > a.min(1)) & (b.max(1) > b.min(1)) if n else ok
    if not ok.any():
        return rho, iou
    ra = rankdata(a[ok], axis=1)
    rb = rankdata(b[ok], axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    rho[ok] = (ra * rb).sum(1) / np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    k = math.ceil(TOP_SHARE * p)
    ta = np.argsort(-a[ok], axis=1, kind="stable")[:, :k]
    tb = np.argsort(-b[ok], axis=1, kind="stable")[:, :k]
    ma = np.zeros((len(ta), p), bool)
    mb = np.zeros((len(tb), p), bool)
    np.put_along_axis(ma, ta, True, 1)
    np.put_along_axis(mb, tb, True, 1)
    iou[ok] = (ma & mb).sum(1) / (ma | mb).sum(1)
    return rho, iou


def _fingerprints(r: StoreReader) -> dict[str, Any]:
    return {k: v for k, v in r.attrs.items() if k.endswith("fingerprint")}


def compare_stores(
    reader: StoreReader,
    other: str,
    *,
    maps: tuple[str, str] = ("maps", "maps"),
    store: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare ``reader``'s ``maps[0]`` with ``other``'s ``maps[1]`` row by row, unit by
    unit (finished units of both), and write ``analysis/compare``. Refuses stores over
    different manifests. Returns the attributes written (counts, means)."""
    o = reader if other == reader.path else open_reader(other, storage_options)
    if o.num_rows != reader.num_rows:
        raise ValueError(f"cannot compare {reader.path} ({reader.num_rows} rows) with "
                         f"{o.path} ({o.num_rows} rows): not the same manifest")  # fmt: skip
    fa, fb = (reader.attrs.get("manifest_fingerprint"), o.attrs.get("manifest_fingerprint"))
    if fa and fb and fa != fb:
        raise ValueError(f"cannot compare {reader.path} with {o.path}: their manifests differ "
                         f"(fingerprints {fa} and {fb})")  # fmt: skip
    for r, name in ((reader, maps[0]), (o, maps[1])):
        if name not in r.group:
            raise ValueError(f"{r.path} has no map array {name!r} (choose maps, "
                             "methods/<name> of a run with --method, or components/<member> "
                             "of a run with --components)")  # fmt: skip
    if store is None:
        from pipeline.store.io import open_store

        store = open_store(reader.path, mode="r+", storage_options=storage_options).store
    other_done = o.done_units()
    key = {"other": o.path, "other_fingerprints": _fingerprints(o), "maps": list(maps),
           "units": sorted(reader.done_units()), "other_units": sorted(other_done),
           "source": _fingerprints(reader) | {"created_at": reader.attrs.get("created_at")}}
    try:
        old = dict(zarr.open_group(store, path=f"{ANALYSIS}/compare", mode="r",
                                   use_consolidated=False).attrs)  # fmt: skip
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        old = {}
    if old.get("key") == json.loads(json.dumps(key, default=str)):
        return old  # nothing changed since it was computed
    n, unit = reader.num_rows, reader.unit_size
    g = zarr.open_group(store, path=f"{ANALYSIS}/compare", mode="w")
    zrho = zarr.create_array(store, name=f"{ANALYSIS}/compare/spearman", shape=(n,),
                             chunks=(unit,), dtype="f4", fill_value=float("nan"),
                             dimension_names=("image",))  # fmt: skip
    ziou = zarr.create_array(store, name=f"{ANALYSIS}/compare/top_iou", shape=(n,),
                             chunks=(unit,), dtype="f4", fill_value=float("nan"),
                             dimension_names=("image",))  # fmt: skip
    sums: dict[int, np.ndarray] = {}
    compared = 0
    units = []
    for u in sorted(reader.done_units()):
        s, e = reader.unit_range(u)
        # every row of the unit must lie in a finished unit of the other store
        if any(v not in other_done for v in range(s // o.unit_size, (e - 1) // o.unit_size + 1)):
            continue
        units.append(u)
        ok = (np.asarray(reader.group["status"][s:e]) == int(Status.OK)) & \
             (np.asarray(o.group["status"][s:e]) == int(Status.OK))  # fmt: skip
        idx = np.nonzero(ok)[0]
        rho = np.full(e - s, np.nan, dtype=np.float32)
        iou = np.full(e - s, np.nan, dtype=np.float32)
        if len(idx):
            try:
                a = np.asarray(reader.group[maps[0]][s:e], dtype=np.float32)[idx]
                b = np.asarray(o.group[maps[1]][s:e], dtype=np.float32)[idx]
            except Exception:  # an unreadable shard: its rows stay NaN (not compared)
                a = b = None
            if a is not None:
                r1, i1 = compare_maps(a, b)
                rho[idx], iou[idx] = r1, i1
        zrho[s:e], ziou[s:e] = rho, iou
        tgt = np.asarray(reader.group["target"][s:e])
        good = np.isfinite(rho)
        compared += int(good.sum())
        for c in np.unique(tgt[good]).tolist():
            m = good & (tgt == c)
            sums[c] = sums.get(c, 0) + np.array([m.sum(), rho[m].sum(), iou[m].sum()], float)
    classes = sorted(sums)
    nc = len(classes)
    table = np.array([sums[c] for c in classes]).reshape(nc, 3)
    for name, dtype, fill, values in (
        ("class", "i4", -1, np.asarray(classes, dtype=np.int32)),
        ("count", "i8", 0, table[:, 0].astype(np.int64)),
        ("spearman_mean", "f4", float("nan"), (table[:, 1] / np.maximum(table[:, 0], 1))),
        ("top_iou_mean", "f4", float("nan"), (table[:, 2] / np.maximum(table[:, 0], 1))),
    ):
        arr = zarr.create_array(store, name=f"{ANALYSIS}/compare/{name}", shape=(nc,),
                                chunks=(max(nc, 1),), dtype=dtype, fill_value=fill,
                                dimension_names=("class",))  # fmt: skip
        arr[:] = values.astype(dtype)
    info = {
        "other": o.path,
        "other_fingerprints": _fingerprints(o),
        "maps": list(maps),
        "units": units,
        "rows_compared": compared,
        "top_share": TOP_SHARE,
        "spearman_mean": float(table[:, 1].sum() / max(compared, 1)) if compared else None,
        "top_iou_mean": float(table[:, 2].sum() / max(compared, 1)) if compared else None,
        "key": key,
    }
    g.update_attributes(info)
    return info
