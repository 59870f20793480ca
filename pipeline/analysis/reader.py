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

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline.analysis.images import overlay_image
from pipeline.analysis.results import AnalysisResults, open_analysis
from pipeline.data.decode import Status, decode_image, read_bytes
from pipeline.data.manifest import Manifest
from pipeline.run.summary import MAX_FAILED_ROWS
from pipeline.store.io import done_units, open_store
from pipeline.store.layout import (
    LAYOUT_ATTR,
    StoreError,
    StoreFormatError,
    StoreLayout,
    safe_name,
)
from pipeline.store.lease import describe_lease, read_lease
from pipeline.store.verify import VerifyReport, verify_store

__all__ = [
    "ClassStats",
    "StoreReader",
    "StoreStatus",
    "TopRow",
    "open_reader",
]


@dataclass
class StoreStatus:
    """Where a run stands (from markers and the status array)."""

    store: str
    num_rows: int
    num_units: int
    units_done: int
    rows_done: int
    rows_by_status: dict[str, int]
    complete: bool
    attrs: dict[str, Any] = field(default_factory=dict)
    #: finished / in progress (...) / interrupted / incomplete (see ``StoreReader.status``)
    state: str = ""
    #: ``(row id, uri, status, message)`` of the first failed rows (at most 10).
    failed_rows: list[tuple[int, str, str, str]] = field(default_factory=list)
    #: the driver lease (host, pid, started_at, heartbeat, ...), None when no driver holds it
    lease: dict[str, Any] | None = None

    def format(self) -> str:
        a = self.attrs
        state = self.state or ("finished" if self.complete else "incomplete")
        lines = [
            f"store: {self.store}",
            f"state: {state}",
            f"units: {self.units_done} of {self.num_units} done",
            f"rows:  {self.rows_done} of {self.num_rows} written",
            "driver lease: " + (describe_lease(self.lease) if self.lease else "free"),
        ]
        if self.rows_by_status:
            lines.append(
                "rows by status: "
                + ", ".join(f"{k}={v}" for k, v in sorted(self.rows_by_status.items()))
            )
        for row, uri, status, message in self.failed_rows:
            lines.append(f"  row {row} {uri or '<inline image>'}: {status}: {message}")
        failed = sum(v for k, v in self.rows_by_status.items() if k != "OK")
        if failed > len(self.failed_rows):
            lines.append(
                f"  ... {failed - len(self.failed_rows)} more failed rows: unioncam export "
                f"{self.store} --csv FILE lists every row with its file and status"
            )
        if a:
            lines.append(
                f"model: {a.get('model')} ({a.get('weights')}), layer {a.get('layer')}, "
                f"image size {a.get('image_size')}, explainer {a.get('explainer', 'unioncam')}"
            )
            if a.get("methods"):
                lines.append("methods: " + ", ".join(a["methods"]))
            if a.get("pool"):
                lines.append("pool: " + ", ".join(a["pool"]))
            if a.get("manifest"):
                lines.append(f"manifest: {a['manifest']}")
        return "\n".join(lines)


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

    # ------------------------------------------------------------------ basics
    def done_units(self) -> set[int]:
        return set(done_units(self.path, storage_options=self.storage_options))

    def unit_range(self, u: int) -> tuple[int, int]:
        return self.layout.unit_range(u)

    def iter_units(self, names: Iterable[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield (first row, arrays) for every finished unit, one shard at a time."""
        names = list(names)
        for u in sorted(self.done_units()):
            start, stop = self.unit_range(u)
            yield start, {n: np.asarray(self.group[n][start:stop]) for n in names}

    def read_columns(self, names: Iterable[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Row ids and the given per-row arrays of every finished unit, concatenated
        (per-row scalars only: a column of maps would not fit in memory)."""
        names = list(names)
        rows: list[np.ndarray] = []
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start, a in self.iter_units(names):
            n_rows = a[names[0]].shape[0] if names else 0
            rows.append(np.arange(start, start + n_rows, dtype=np.int64))
            for n in names:
                parts[n].append(a[n])
        cols = {
            n: np.concatenate(parts[n]) if parts[n]
            else np.zeros((0, *self.group[n].shape[1:]), dtype=self.group[n].dtype)
            for n in names
        }  # fmt: skip
        return (np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)), cols

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

    # ------------------------------------------------------------------ status
    def status(self) -> StoreStatus:
        done = self.done_units()
        counts: dict[str, int] = {}
        rows_done = 0
        failed: list[tuple[int, str, str, str]] = []
        for start, a in self.iter_units(["status"]):
            st = a["status"]
            rows_done += st.shape[0]
            for i in np.nonzero(st != int(Status.OK))[0][: MAX_FAILED_ROWS - len(failed)]:
                r = start + int(i)
                failed.append((r, _as_str(np.asarray(self.group["uri"][r]).item()),
                               _status_name(int(st[i])),
                               _as_str(np.asarray(self.group["error"][r]).item())))  # fmt: skip
            vals, cnt = np.unique(st, return_counts=True)
            for v, c in zip(vals.tolist(), cnt.tolist(), strict=True):
                name = Status(v).name if v in Status._value2member_map_ else str(v)
                counts[name] = counts.get(name, 0) + int(c)
        run_state = self._run_state(len(done) == self.num_units)
        keep = {
            k: self.attrs.get(k)
            for k in (
                "model",
                "weights",
                "layer",
                "image_size",
                "methods",
                "pool",
                "manifest",
                "explainer",
                "target",
            )
            if k in self.attrs
        }
        return StoreStatus(
            store=self.path,
            num_rows=self.num_rows,
            num_units=self.num_units,
            units_done=len(done),
            rows_done=rows_done,
            rows_by_status=counts,
            complete=len(done) == self.num_units,
            attrs=keep,
            state=run_state,
            failed_rows=failed,
            lease=read_lease(self.path, storage_options=self.storage_options),
        )

    def verify(self, deep: bool = False, repair: bool = False) -> VerifyReport:
        """Check every finished unit against its marker (see :func:`verify_store`):
        objects present with their sizes; ``deep`` also checksums and row counts."""
        return verify_store(self.path, self.storage_options, deep=deep, repair=repair)

    def _run_state(self, complete: bool) -> str:
        """finished / in progress / interrupted / incomplete, from the driver's attributes."""
        import socket

        rs = self.attrs.get("run_state") or {}
        state = rs.get("state", "")
        if complete:
            return "finished"
        if state == "running":
            where = f"driver pid {rs.get('pid')} on {rs.get('host')}, since {rs.get('at')}"
            if rs.get("host") == socket.gethostname() and rs.get("pid"):
                try:
                    os.kill(int(rs["pid"]), 0)
                except ProcessLookupError:
                    return f"interrupted (the driver, {where}, is gone); rerun to resume"
                except OSError:
                    pass
            return f"in progress ({where})"
        if state in ("interrupted", "failed", "incomplete"):
            detail = f": {rs['detail']}" if rs.get("detail") else ""
            return f"{state}{detail}; rerun the same command to resume"
        return "incomplete"

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
        want = sorted(set(names) | {"status", "target", "label", "uri"}
                      | ({"selected"} if self.layout.has_pool else set()))
        best_ids = np.zeros(0, dtype=np.int64)
        best_val = np.zeros(0, dtype=np.float64)
        info: dict[int, tuple[int, int, int, str]] = {}
        sign = -1.0 if largest else 1.0
        for start, a in self.iter_units(want):
            ok = a["status"] == int(Status.OK)
            if class_index is not None:
                ok &= a["target"] == class_index
            v = np.asarray(get(a), dtype=np.float64)
            ok &= np.isfinite(v)
            idx = np.nonzero(ok)[0]
            if not len(idx):
                continue
            ids = np.concatenate([best_ids, start + idx])
            vals = np.concatenate([best_val, v[idx]])
            for i in idx.tolist():
                info[start + i] = (
                    int(a["target"][i]),
                    int(a["label"][i]),
                    int(a["selected"][i]) if "selected" in a else -1,
                    _as_str(a["uri"][i]),
                )
            order = np.lexsort((ids, sign * vals))[:k]  # stable: ties by row id
            best_ids, best_val = ids[order], vals[order]
            info = {int(r): info[int(r)] for r in best_ids}
        return [
            TopRow(
                row_id=int(r),
                score=float(v),
                target=info[int(r)][0],
                label=info[int(r)][1],
                selected=self.pool[info[int(r)][2]]
                if 0 <= info[int(r)][2] < len(self.pool)
                else "",
                uri=info[int(r)][3],
            )
            for r, v in zip(best_ids.tolist(), best_val.tolist(), strict=True)
        ]

    # ------------------------------------------------------------------ maps
    def _check_rows(self, row_ids: Iterable[int]) -> list[int]:
        rows = [int(r) for r in row_ids]
        for r in rows:
            if not 0 <= r < self.num_rows:
                raise ValueError(f"row id {r} is out of range (the store has {self.num_rows} rows)")
        return rows

    def maps(self, row_ids: Iterable[int], method: str | None = None) -> np.ndarray:
        """One method's maps of the given rows as float32 ``len x S x S`` (NaN for failed
        rows); ``method=None``: :attr:`primary`."""
        arr = self.group[self._maps_path(method)]
        rows = self._check_rows(row_ids)
        if not rows:
            return np.zeros((0, self.image_size, self.image_size), dtype=np.float32)
        return np.stack([np.asarray(arr[r], dtype=np.float32) for r in rows])

    def _maps_path(self, method: str | None) -> str:
        try:
            return self.layout.maps_path(method)
        except StoreError as e:
            raise ValueError(str(e)) from None

    def row(self, row_id: int) -> dict[str, Any]:
        """Every per-row field of one row (small arrays; maps excluded)."""
        (r,) = self._check_rows([row_id])
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
        out["status_name"] = (
            Status(out["status"]).name
            if out["status"] in Status._value2member_map_
            else str(out["status"])
        )
        if "beta" in g:
            out["beta"] = np.asarray(g["beta"][r], dtype=np.float64).tolist()
        if "selection_score" in g:
            out["selection_score"] = np.asarray(g["selection_score"][r], np.float64).tolist()
        out["orig_size"] = tuple(int(v) for v in np.asarray(g["orig_size"][r]))
        out["crop_box"] = tuple(int(v) for v in np.asarray(g["crop_box"][r]))
        out["error"] = _as_str(np.asarray(g["error"][r]).item())
        out["uri"] = _as_str(np.asarray(g["uri"][r]).item())
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
        path = self._maps_path(method)
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

    def overlay(
        self, row_id: int, *, alpha: float = 0.5, cmap: str = "jet", manifest: str | None = None,
        method: str | None = None,
    ):
        """The row's map (of ``method``; ``None``: :attr:`primary`) placed on its original
        image (``PIL.Image``, RGB)."""
        info = self.row(row_id)
        if info["status_name"] != "OK":
            raise ValueError(
                f"row {row_id} has no map: status {info['status_name']} ({info['error']})"
            )
        image = self.original_image(row_id, manifest=manifest)
        m = self.maps([row_id], method=method)[0]
        return overlay_image(image, m, info["crop_box"], alpha=alpha, cmap=cmap)

    def write_overlays(
        self,
        row_ids: Iterable[int],
        out_dir: str | Path,
        *,
        alpha: float = 0.5,
        cmap: str = "jet",
        manifest: str | None = None,
        class_names: list[str] | None = None,
        method: str | None = None,
    ) -> list[Path]:
        """Write ``<row id>_<file stem>.png`` overlays; rows without a map are skipped.

        The file's stem makes the PNG findable next to the photo it came from; the class
        name stands in for photos with no file name (inline bytes). A ``method`` other than
        the store's primary one is added to the name (``<row id>_<stem>_gradcam.png``), so
        the overlays of two methods can share a folder.
        """
        suffix = "" if method in (None, self.primary) else f"_{safe_name(method)}"
        self._maps_path(method)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for r in self._check_rows(row_ids):
            info = self.row(r)
            if info["status_name"] != "OK":
                continue
            img = self.overlay(r, alpha=alpha, cmap=cmap, manifest=manifest, method=method)
            c = info.get("target", -1)
            stem = PurePosixPath(info["uri"]).stem if info["uri"] else ""
            if not stem and class_names and 0 <= c < len(class_names):
                stem = class_names[c]
            tag = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in stem).strip("_")
            p = out / (f"{r:07d}_{tag[:60]}{suffix}.png" if tag else f"{r:07d}{suffix}.png")
            img.save(p, format="PNG")
            paths.append(p)
        return paths


def _status_name(v: int) -> str:
    return Status(v).name if v in Status._value2member_map_ else str(v)


def _as_str(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return "" if v is None else str(v)


def _plain(d: Any) -> Any:
    """Attributes may come back as zarr/JSON wrappers; make them plain Python."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, list | tuple):
        return [_plain(v) for v in d]
    return d
