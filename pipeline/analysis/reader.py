"""Read a pipeline store: status, per-class statistics, top-k, maps, overlays, mean maps.

Why it reads the way it does: a store for ImageNet-train holds 1.28 M maps (~130 GB of
float16), so nothing here loads a whole array. Every scan walks the store one unit (=
one shard) at a time and keeps only running aggregates (counts, sums, a k-sized candidate
list); maps are read row by row (one inner chunk each) or, for class means, only for the
rows of the requested classes. Units without a completion marker are skipped, so queries
on a run that is still going see only finished units.

Score names accepted by :meth:`StoreReader.top_k` (see :meth:`StoreReader.score_names`):
``beta`` (β of the selected map), ``prob`` (p of the explained class), ``baseline_prob``,
``beta:<pool member>`` (e.g. ``beta:region:scorecam``), ``metrics/<name>`` if the run
stored metrics, ``selection_score`` (the selected member's score under the run's selection
rule, e.g. ``insdel-8`` of the default ``faithful`` preset; β for the ``beta`` rule) and
``selection_score:<pool member>``. Rows whose score is NaN or ±inf (a flat map under a ranking
rule scores −inf) are left out of a top-k, in either direction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.analysis.results import AnalysisResults, open_analysis
from pipeline.data.decode import Status, decode_image, read_bytes
from pipeline.data.manifest import Manifest
from pipeline.store.io import open_store
from pipeline.store.layout import (
    LAYOUT_ATTR,
    StoreError,
    StoreFormatError,
    StoreLayout,
    safe_name,
)
from pipeline.store.names import status_name, text
from pipeline.store.units import done_units
from pipeline.store.verify import VerifyReport, verify_store

__all__ = [
    "ClassStats",
    "StoreReader",
    "TopRow",
    "open_reader",
]


@dataclass
class ClassStats:
    """Per-class aggregates over OK rows."""

    class_index: int
    count: int
    mean_beta: float  # β of the selected member
    mean_prob: float
    mean_scores: dict[str, float]  # β of each pool member
    wins: dict[str, int]  # how often each pool member was selected
    mean_metrics: dict[str, float] = field(default_factory=dict)  # metrics/<name>, NaN-skipping


@dataclass(frozen=True)
class TopRow:
    row_id: int
    score: float
    target: int
    label: int
    selected: str
    uri: str = ""


def open_reader(store: str, storage_options: dict[str, Any] | None = None) -> StoreReader:
    """Open a store for queries (read-only)."""
    return StoreReader(store, storage_options=storage_options)


class StoreReader:
    """Lazy, unit-by-unit access to a pipeline store."""

    def __init__(self, store: str, storage_options: dict[str, Any] | None = None) -> None:
        self.path = str(store)
        self.storage_options = storage_options or None
        try:
            self.group = open_store(self.path, mode="r", storage_options=self.storage_options)
        except (FileNotFoundError, StoreFormatError):
            raise
        except Exception as e:
            msg = " ".join(str(e).split())
            raise ValueError(f"cannot open store {self.path}: {msg}") from None
        self.attrs: dict[str, Any] = _plain(dict(self.group.attrs))
        if "maps" not in self.group or "status" not in self.group:
            raise ValueError(
                f"{self.path} is not a unioncam pipeline store (no maps/status arrays)"
            )
        #: The store's layout (the contract its writer used): units, pool, arrays.
        self.layout = StoreLayout.from_dict(self.attrs[LAYOUT_ATTR])
        self.num_rows = self.layout.num_rows
        self.unit_size = self.layout.unit_size
        self.num_units = self.layout.num_units
        self.pool: tuple[str, ...] = self.layout.pool
        #: The CAM methods whose maps the store holds; ``maps(..., method=None)`` means
        #: :attr:`primary` (UnionCAM when the run had it).
        self.methods: tuple[str, ...] = self.layout.methods
        self.primary: str = self.layout.primary
        self.image_size = int(self.layout.image_size[-1])
        #: The stored maps' side (``image_size``, or smaller with ``--map-size``).
        self.map_size = int(self.layout.map_size[-1])
        # One listing of the finished units serves every query of this reader: a run still
        # writing is seen as it was when the reader opened (status lists afresh).
        self._done = frozenset(done_units(self.path, storage_options=self.storage_options))

    # ------------------------------------------------------------------ basics
    def done_units(self) -> set[int]:
        """The units finished when this reader opened (their markers exist)."""
        return set(self._done)

    def unit_range(self, u: int) -> tuple[int, int]:
        return self.layout.unit_range(u)

    def rows_of(self, units: Iterable[int]) -> np.ndarray:
        """Row ids of ``units``, ascending (int64)."""
        parts = [np.arange(*self.unit_range(u), dtype=np.int64) for u in sorted(units)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def iter_units(self, names: Iterable[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield (first row, arrays) for every finished unit, one shard at a time."""
        names = list(names)
        for u in sorted(self.done_units()):
            start, stop = self.unit_range(u)
            yield start, {n: np.asarray(self.group[n][start:stop]) for n in names}

    def read_columns(self, names: Iterable[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Row ids and the given per-row arrays of every finished unit, concatenated
        (per-row scalars only: a column of maps would not fit in memory)."""
        rows = self.rows_of(self._done)
        # Whole columns in one read each (zarr fetches a column's unit chunks concurrently:
        # ~10x the rows/s of a read per unit), then the finished units' rows.
        full = len(rows) == self.num_rows
        cols = {n: (lambda a: a if full else a[rows])(np.asarray(self.group[n][:]))
                for n in names}  # fmt: skip
        return rows, cols

    def metric_paths(self) -> dict[str, str]:
        """Stored metric name (``insertion@region:scorecam``) -> array path in the store."""
        return {n: f"metrics/{safe_name(n)}" for n in self.layout.metrics}

    def score_names(self) -> list[str]:
        names = ["prob"]
        if self.layout.has_pool:
            names += ["beta", "baseline_prob"] + [f"beta:{p}" for p in self.pool]
        if "selection_score" in self.group:
            names += ["selection_score"] + [f"selection_score:{p}" for p in self.pool]
        if "metrics" in self.group:
            names += [f"metrics/{k}" for k in sorted(self.group["metrics"].array_keys())]
        return names

    def analysis(self) -> AnalysisResults | None:
        """What ``unioncam analyze`` stored in the store's ``analysis`` group (descriptors,
        per-class tables, strategies, comparison), or None when it was not analysed."""
        return open_analysis(self.group.store)

    def verify(self, deep: bool = False, repair: bool = False) -> VerifyReport:
        """Check every finished unit against its marker (see :func:`verify_store`):
        objects present with their sizes; ``deep`` also checksums and row counts."""
        return verify_store(self.path, self.storage_options, deep=deep, repair=repair)

    # ------------------------------------------------------------------ statistics
    def class_stats(self, by: str = "target") -> list[ClassStats]:
        """Per-class mean β (selected and per member), mean p, and selection counts.

        ``by``: ``target`` (default) or ``label`` (the manifest's labels).
        """
        if by not in ("target", "label", "predicted"):
            raise ValueError(f"by must be target, label or predicted, got {by!r}")
        p = len(self.pool)
        metric_arrays = self.metric_paths()
        msum: dict[int, dict[str, float]] = {}
        mcount: dict[int, dict[str, int]] = {}
        count: dict[int, int] = {}
        sums: dict[int, np.ndarray] = {}  # [beta_sel, prob, beta_0..beta_p-1]
        wins: dict[int, np.ndarray] = {}
        union = ["beta", "selected"] if self.layout.has_pool else []  # else: β is NaN
        want = [by, *union, "prob", "status", *metric_arrays.values()]
        for _start, a in self.iter_units(want):
            ok = a["status"] == int(Status.OK)
            if not ok.any():
                continue
            for c in np.unique(a[by][ok]).tolist():
                rows = ok & (a[by] == c)
                for name, path in metric_arrays.items():
                    v = a[path][rows].astype(np.float64)
                    v = v[np.isfinite(v)]
                    sums_c, counts_c = msum.setdefault(c, {}), mcount.setdefault(c, {})
                    sums_c[name] = sums_c.get(name, 0.0) + float(v.sum())
                    counts_c[name] = counts_c.get(name, 0) + int(v.size)
            cls = a[by][ok].astype(np.int64)
            if union:
                sc = a["beta"][ok].astype(np.float64)
                sel = a["selected"][ok].astype(np.int64)
                beta_sel = sc[np.arange(sc.shape[0]), sel]
            else:
                sc, sel = np.zeros((len(cls), 0)), np.zeros(len(cls), dtype=np.int64)
                beta_sel = np.full(len(cls), np.nan)
            prob = a["prob"][ok].astype(np.float64)
            for c in np.unique(cls).tolist():
                m = cls == c
                row = np.concatenate([[beta_sel[m].sum(), prob[m].sum()], sc[m].sum(0)])
                sums[c] = sums.get(c, 0) + row
                wins[c] = wins.get(c, 0) + np.bincount(sel[m], minlength=p)
                count[c] = count.get(c, 0) + int(m.sum())
        out = []
        for c in sorted(count):
            n = count[c]
            s = sums[c] / n
            out.append(
                ClassStats(
                    class_index=int(c),
                    count=n,
                    mean_beta=float(s[0]),
                    mean_prob=float(s[1]),
                    mean_scores={name: float(s[2 + i]) for i, name in enumerate(self.pool)},
                    wins={name: int(wins[c][i]) for i, name in enumerate(self.pool)},
                    mean_metrics={
                        k: (msum[c][k] / mcount[c][k] if mcount[c][k] else float("nan"))
                        for k in msum.get(c, {})
                    },
                )
            )
        return out

    def _score_arrays(self, score: str) -> tuple[list[str], Any]:
        if score not in self.score_names():
            raise ValueError(
                f"unknown score {score!r}; choose from {', '.join(self.score_names())}"
            )
        if score == "beta":
            return ["beta", "selected"], lambda a: a["beta"][
                np.arange(len(a["selected"])), np.maximum(a["selected"], 0)
            ]
        if score in ("prob", "baseline_prob"):
            return [score], lambda a: a[score]
        if score == "selection_score" and "selection_score" in self.group:
            return ["selection_score", "selected"], lambda a: a["selection_score"][
                np.arange(len(a["selected"])), np.maximum(a["selected"], 0)
            ]
        for prefix, array in (("beta:", "beta"), ("selection_score:", "selection_score")):
            if not score.startswith(prefix) or array not in self.group:
                continue
            name = score[len(prefix):]
            if name not in self.pool:
                raise ValueError(
                    f"unknown pool member {name!r}; the pool is {', '.join(self.pool)}"
                )
            i = self.pool.index(name)
            return [array], lambda a, array=array, i=i: a[array][:, i]
        if score.startswith("metrics/") and score in self.group:
            return [score], lambda a: a[score]
        raise ValueError(f"unknown score {score!r}; choose from {', '.join(self.score_names())}")

    def top_k(
        self,
        score: str = "beta",
        k: int = 10,
        *,
        largest: bool = True,
        class_index: int | None = None,
    ) -> list[TopRow]:
        """The ``k`` OK rows with the largest (or smallest) ``score``; optionally one class."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        names, get = self._score_arrays(score)
        # Whole columns of the numbers (beta is N x P float32: 15 MB for ImageNet train),
        # then the k winners' other fields by point reads: a scan that read every unit's
        # strings took ~25 s at ImageNet's row count.
        want = sorted(set(names) | {"status", "target"})
        rows, a = self.read_columns(want)
        ok = a["status"] == int(Status.OK)
        if class_index is not None:
            ok &= a["target"] == class_index
        v = np.asarray(get(a), dtype=np.float64)
        ok &= np.isfinite(v)
        idx = np.nonzero(ok)[0]
        sign = -1.0 if largest else 1.0
        order = idx[np.lexsort((rows[idx], sign * v[idx]))[:k]]  # stable: ties by row id
        g = self.group
        out = []
        for i in order.tolist():
            r = int(rows[i])
            sel = int(np.asarray(g["selected"][r])) if self.layout.has_pool else -1
            out.append(TopRow(row_id=r, score=float(v[i]), target=int(a["target"][i]),
                              label=int(np.asarray(g["label"][r])),
                              selected=self.pool[sel] if 0 <= sel < len(self.pool) else "",
                              uri=text(np.asarray(g["uri"][r]).item())))  # fmt: skip
        return out

    # ------------------------------------------------------------------ maps
    def check_rows(self, row_ids: Iterable[int]) -> list[int]:
        """``row_ids`` as ints, each checked against the store's rows (one-line error)."""
        rows = [int(r) for r in row_ids]
        for r in rows:
            if not 0 <= r < self.num_rows:
                raise ValueError(f"row id {r} is out of range (the store has {self.num_rows} rows)")
        return rows

    def maps(self, row_ids: Iterable[int], method: str | None = None) -> np.ndarray:
        """One method's maps of the given rows as float32 ``len x S x S`` (NaN for failed
        rows); ``method=None``: :attr:`primary`."""
        arr = self.group[self.maps_path(method)]
        rows = self.check_rows(row_ids)
        if not rows:
            return np.zeros((0, self.image_size, self.image_size), dtype=np.float32)
        # One orthogonal read: each inner chunk is fetched and decoded once, however many of
        # the rows it holds (a read per row decoded a 16-row chunk up to 16 times).
        uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        return np.asarray(arr.oindex[uniq], dtype=np.float32)[inverse]

    def maps_path(self, method: str | None) -> str:
        """The array holding ``method``'s maps (``None``: the primary's); one-line error."""
        try:
            return self.layout.maps_path(method)
        except StoreError as e:
            raise ValueError(str(e)) from None

    def row(self, row_id: int) -> dict[str, Any]:
        """Every per-row field of one row (small arrays; maps excluded)."""
        (r,) = self.check_rows([row_id])
        g = self.group
        out: dict[str, Any] = {"row_id": r}
        for name in (
            "status",
            "target",
            "label",
            "predicted",
            "prob",
            "baseline_prob",
            "selected",
        ):
            if name in g:
                out[name] = np.asarray(g[name][r]).item()
        out["status_name"] = status_name(out["status"])
        if "beta" in g:
            out["beta"] = np.asarray(g["beta"][r], dtype=np.float64).tolist()
        if "selection_score" in g:
            out["selection_score"] = np.asarray(g["selection_score"][r], np.float64).tolist()
        out["orig_size"] = tuple(int(v) for v in np.asarray(g["orig_size"][r]))
        out["crop_box"] = tuple(int(v) for v in np.asarray(g["crop_box"][r]))
        out["error"] = text(np.asarray(g["error"][r]).item())
        out["uri"] = text(np.asarray(g["uri"][r]).item())
        sel = out.get("selected", -1)
        out["selected_name"] = self.pool[sel] if 0 <= sel < len(self.pool) else ""
        return out

    def mean_maps(
        self,
        classes: Iterable[int] | None = None,
        *,
        by: str = "target",
        rows_per_read: int = 256,
        method: str | None = None,
    ) -> dict[int, tuple[np.ndarray, int]]:
        """Mean map (of one method; ``None``: :attr:`primary`) of the OK rows of each class:
        ``{class: (S x S float32, count)}``.

        Reads only the rows of the requested classes (all classes if ``None``), at most
        ``rows_per_read`` maps at a time.
        """
        path = self.maps_path(method)
        want = None if classes is None else {int(c) for c in classes}
        sums: dict[int, np.ndarray] = {}
        counts: dict[int, int] = {}
        arr = self.group[path]
        for start, a in self.iter_units([by, "status"]):
            ok = a["status"] == int(Status.OK)
            cls = a[by]
            if want is not None:
                ok &= np.isin(cls, list(want))
            idx = np.nonzero(ok)[0]
            for j in range(0, len(idx), rows_per_read):
                part = idx[j : j + rows_per_read]
                m = np.asarray(arr.oindex[(start + part).tolist()], dtype=np.float64)
                for c in np.unique(cls[part]).tolist():
                    sel = cls[part] == c
                    sums[c] = sums.get(c, 0) + m[sel].sum(0)
                    counts[c] = counts.get(c, 0) + int(sel.sum())
        return {c: ((sums[c] / counts[c]).astype(np.float32), counts[c]) for c in sorted(sums)}

    # ------------------------------------------------------------------ overlays
    def original_image(self, row_id: int, manifest: str | None = None):
        """Decode the original image of a row (via the manifest recorded in the store)."""
        r = self._manifest_row(row_id, manifest)
        if r.error is not None:  # a shard row whose bytes could not be fetched
            raise r.error
        data = (
            r.data
            if r.data is not None
            else read_bytes(r.uri, storage_options=self.storage_options)
        )
        return decode_image(data, uri=r.uri)

    def model_input(self, row_id: int, preprocess: Any, manifest: str | None = None) -> Any:
        """The row's image as the run's workers gave it to the model: the same reader,
        draft JPEG decoding and ``preprocess``, so re-explaining it (the report's sanity
        check) starts from the run's input, not from a full-resolution decode of it."""
        from pipeline.data.decode import load_row

        r = self._manifest_row(row_id, manifest)
        tensor, _, _, status, message = load_row(r, preprocess, self.storage_options)
        if tensor is None:
            raise ValueError(message or f"row {row_id}: {Status(status).name}")
        return tensor

    def _manifest_row(self, row_id: int, manifest: str | None):
        """The manifest row of ``row_id`` (the store's recorded manifest unless given)."""
        uri = manifest or self.attrs.get("manifest")
        if not uri:
            raise ValueError(f"{self.path} records no manifest; pass manifest=")
        try:
            (r,) = self._manifest(uri).get_rows([row_id])
        except IndexError as e:
            raise ValueError(f"row id {row_id}: {e}") from None
        return r

    def _manifest(self, uri: str):
        cached = getattr(self, "_manifest_cache", None)
        if cached is not None and cached[0] == uri:
            return cached[1]
        m = Manifest.open(uri, storage_options=self.storage_options)
        self._manifest_cache = (uri, m)
        return m

def _plain(d: Any) -> Any:
    """Attributes may come back as zarr/JSON wrappers; make them plain Python."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, list | tuple):
        return [_plain(v) for v in d]
    return d
