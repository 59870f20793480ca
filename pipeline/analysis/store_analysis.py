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
from pipeline.analysis.descriptors import DESCRIPTORS, describe, downsample
from pipeline.analysis.reader import StoreReader, open_reader
from pipeline.analysis.results import ANALYSIS, DESCRIBED, create_array
from pipeline.analysis.tables import write_tables
from pipeline.data.decode import Status
from pipeline.store.io import open_store
from pipeline.store.lease import StoreLease, refresh_consolidated

IMAGENET_CLASSES = Path(__file__).resolve().parents[1] / "data" / "imagenet_classes.txt"

__all__ = ["AnalysisConfig", "AnalysisSummary", "analyze", "describe_units"]

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


def _row_arrays(reader: StoreReader, cfg: AnalysisConfig, store: Any) -> None:
    """Create (empty) the per-row arrays: the driver's job, before any unit is described."""
    n, u = reader.num_rows, reader.unit_size
    side = min(cfg.thumb_side, reader.map_size)
    zarr.open_group(store, path=ANALYSIS, mode="w",
                    attributes={"description": "unioncam analyze: see pipeline/analysis/results.py"})  # fmt: skip
    zarr.open_group(store, path=f"{ANALYSIS}/rows", mode="w")
    for d in DESCRIPTORS:
        create_array(store, f"rows/{d}", (n,), (u,), "f4", float("nan"), ("image",))
    create_array(store, "rows/described", (n,), (u,), "u1", DESCRIBED["NOT_ANALYSED"], ("image",),
            {"codes": DESCRIBED})  # fmt: skip
    create_array(store, "rows/thumbs", (n, side, side), (u, side, side), "f2", float("nan"),
            ("image", "ty", "tx"), {"description": "the map area-averaged to a thumbnail"})
    if cfg.boxes:
        for name in LOCALISATION:
            create_array(store, f"rows/{name}", (n,), (u,), "f4", float("nan"), ("image",))
    create_array(store, "rows/group", (n,), (u,), "i4", -1, ("image",))
    create_array(store, "rows/strategy", (n,), (u,), "i1", -1, ("image",))
    create_array(store, "rows/strategy_distance", (n,), (u,), "f4", float("nan"), ("image",))


class _Describer:
    """Step 1 over one open store: the reader and every ``analysis/rows`` array are opened
    once per pass (not per unit: that was 2 opens and ~15 metadata reads a unit)."""

    def __init__(self, store_path: str, thumb_side: int,
                 storage_options: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.reader = open_reader(store_path, storage_options)
        store = open_store(store_path, mode="r+", storage_options=storage_options).store
        rows = zarr.open_group(store, path=f"{ANALYSIS}/rows", mode="r+", use_consolidated=False)
        self.rows = {k: rows[k] for k in rows.array_keys()}
        self.side = min(thumb_side, self.reader.map_size)
        g = self.reader.group
        self.maps, self.status, self.crop_box = g["maps"], g["status"], g["crop_box"]

    def _read_maps(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The unit's maps, and which rows could be read; an unreadable shard is retried
        row by row so one bad chunk costs only its rows."""
        try:
            return np.asarray(self.maps[start:stop], dtype=np.float32), np.ones(stop - start, bool)
        except Exception:  # a corrupt shard: read row by row, count the rows that fail
            out = np.full((stop - start, *self.maps.shape[1:]), np.nan, dtype=np.float32)
            ok = np.zeros(stop - start, bool)
            for i in range(stop - start):
                try:
                    out[i] = np.asarray(self.maps[start + i], dtype=np.float32)
                    ok[i] = True
                except Exception:
                    pass
            return out, ok

    def unit(self, u: int, boxes: list[list[tuple[float, float, float, float]]] | None = None
             ) -> dict[str, int]:  # fmt: skip
        """Describe unit ``u`` and write its rows of ``analysis/rows`` (whole chunks); with
        ``boxes`` (per row of the unit) also its localisation scores. Counts by outcome."""
        start, stop = self.reader.unit_range(u)
        ok = np.asarray(self.status[start:stop]) == int(Status.OK)
        maps, readable = self._read_maps(start, stop)
        maps[~ok] = np.nan
        desc, valid = describe(maps)
        valid &= readable & ok
        desc[~valid] = np.nan
        thumbs = downsample(np.where(valid[:, None, None], maps, np.nan), self.side)
        code = np.where(valid, DESCRIBED["DESCRIBED"],
                        np.where(ok, DESCRIBED["BAD_MAP"], DESCRIBED["NO_MAP"])).astype(np.uint8)  # fmt: skip
        for j, d in enumerate(DESCRIPTORS):
            self.rows[d][start:stop] = desc[:, j]
        self.rows["thumbs"][start:stop] = thumbs.astype(np.float16)
        self.rows["described"][start:stop] = code
        if boxes is not None:
            crop = np.asarray(self.crop_box[start:stop])
            h, w = maps.shape[1:]
            masks = np.stack([box_mask(crop[i], boxes[i], h, w) for i in range(stop - start)])
            scored = valid & np.array([len(b) > 0 for b in boxes])
            loc = localisation(maps, masks, scored)
            for j, name in enumerate(LOCALISATION):
                self.rows[name][start:stop] = loc[:, j]
        return {"described": int(valid.sum()), "no_map": int((~ok).sum()),
                "bad_map": int((ok & ~valid).sum())}  # fmt: skip


def describe_units(store_path: str, units: list[int], thumb_side: int,
                   storage_options: dict[str, Any] | None = None,
                   boxes: dict[int, list] | None = None) -> list[tuple[int, dict[str, int]]]:  # fmt: skip
    """Describe ``units`` (the store opened once): ``[(unit, counts by outcome)]``. A plain
    function so that a batch of units can run as one Ray task."""
    d = _Describer(store_path, thumb_side, storage_options)
    return [(u, d.unit(u, (boxes or {}).get(u))) for u in units]


def _run_units(store_path: str, units: list[int], cfg: AnalysisConfig,
               storage_options: dict[str, Any] | None, parallel: bool | None,
               done: Callable[[int, dict[str, int]], None]) -> bool:  # fmt: skip
    """Describe ``units``: as Ray tasks (batches of units, each opening the store once)
    when Ray is initialised (and ``parallel`` is not False), else one after the other in
    this process; ``done`` is called after each unit. Returns whether Ray tasks did it."""
    use_ray = _ray_up(parallel) and len(units) > 1
    unit_boxes = _boxes_of_units(store_path, units, cfg, storage_options)
    if not use_ray:
        if units:
            d = _Describer(store_path, cfg.thumb_side, storage_options)
            for u in units:
                done(u, d.unit(u, unit_boxes.get(u)))
        return False
    import ray

    # ~4 batches per CPU: the store is opened once per batch, and a slow node still
    # balances.
    per = max(1, -(-len(units) // (4 * max(1, int(ray.cluster_resources().get("CPU", 1))))))
    task = ray.remote(num_cpus=1)(describe_units)
    pending = [task.remote(store_path, units[i:i + per], cfg.thumb_side, storage_options,
                           {u: unit_boxes[u] for u in units[i:i + per] if u in unit_boxes})
               for i in range(0, len(units), per)]  # fmt: skip
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for u, c in ray.get(ready[0]):
            done(u, c)
    return True


def _ray_up(parallel: bool | None) -> bool:
    """Whether to hand work to Ray: it is initialised and ``parallel`` is not False."""
    if parallel is False:
        return False
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


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
        summary = _analyze(store, config or AnalysisConfig(), compare, compare_maps,
                           storage_options, parallel, force)
        refresh_consolidated(store, storage_options)
        return summary
    finally:
        lease.release()


def _analyze(store: str, cfg: AnalysisConfig, compare: str | None,
             compare_maps: tuple[str, str], storage_options: dict[str, Any] | None,
             parallel: bool | None, force: bool) -> AnalysisSummary:  # fmt: skip
    """:func:`analyze`'s work, under its lease (the defaults live on :func:`analyze`)."""
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
    todo_all = described | set(todo)

    last_saved = [time.perf_counter()]

    def done(u: int, c: dict[str, int]) -> None:
        described.add(u)
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
        # What a rerun resumes from: saved every 2 s and at the end (a write of the group's
        # metadata per unit was 1,252 rewrites of a growing list for ImageNet).
        if time.perf_counter() - last_saved[0] > 2.0 or len(described) == len(todo_all):
            group.update_attributes({"units": sorted(described), "counts": counts})
            last_saved[0] = time.perf_counter()

    group.update_attributes({"source": source, "params": params})
    timings: dict[str, float] = {}
    t1 = time.perf_counter()
    used_ray = _run_units(store, todo, cfg, storage_options, parallel, done)
    group.update_attributes({"units": sorted(described), "counts": counts})
    timings["describe"] = time.perf_counter() - t1
    recomputed = bool(todo) or not old.get("tables_done")
    ng, gname = old.get("groups", 0), old.get("grouping", "")
    ranking = old.get("top_clever_hans") or []
    if recomputed:
        group.update_attributes({"tables_done": False})
        t2 = time.perf_counter()
        ng, gname, full = write_tables(reader, cfg, zstore, timings, _ray_up(parallel))
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
