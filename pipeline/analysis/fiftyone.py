"""A store's rows as a FiftyOne dataset: the maps as ``fo.Heatmap`` on the original photos.

Why: the atlas answers dataset-wide questions; FiftyOne is where practitioners already dig
into single samples, and its App overlays an ``fo.Heatmap`` on each image and filters by any
field. So each row becomes a sample with its labels, its maps (one field per method), its
scores, its stored metrics and, when ``unioncam analyze`` ran, its descriptors and strategy;
"the Clever-Hans candidates of class 7" is then a filter on ``target`` and
``clever_hans_candidate``.

Placement: FiftyOne stretches a heatmap over the whole image, but a stored map covers only the
center crop the model saw (``crop_box`` in original pixels). Each map is therefore put on a
canvas with the photo's aspect ratio, at the map's own resolution inside the box and 0 (drawn
transparent) outside it, so the App shows it where the model looked.

Media: open-source FiftyOne reads media from local paths only. A row whose ``uri`` is a local
file keeps that path; any other row (``s3://``, ``gs://``, ``http(s)://``, inline bytes, a
shard reference) has its original decoded through the store's manifest and written once as a
JPEG under ``media_dir``.

The only store access is :class:`~pipeline.analysis.reader.StoreReader`'s public API:
``layout``, ``pool``, ``methods``, ``primary``, ``metric_paths()``, ``iter_units()``,
``maps()``, ``original_image()``, ``analysis()`` (and of the analysis ``rows``,
``row_columns()``, ``group_names()``, ``strategies()``, ``group_table()``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.reader import StoreReader
from pipeline.data.classes import class_name
from pipeline.data.decode import Status
from pipeline.store.names import status_name, text

__all__ = ["add_fiftyone_arguments", "export_fiftyone", "field_name", "fiftyone_command", "place_map"]

_FIELD = re.compile(r"[^0-9A-Za-z_]+")
#: Per-row arrays of the store every sample reads.
_ROW_ARRAYS = ("uri", "status", "error", "label", "predicted", "target", "prob", "orig_size",
               "crop_box")  # fmt: skip


def field_name(name: str) -> str:
    """A method, pool member or metric name as a FiftyOne field (``region:scorecam`` ->
    ``region_scorecam``, ``insertion@gradcam`` -> ``insertion_gradcam``): dots and ``$``
    are not allowed in field names."""
    return _FIELD.sub("_", name).strip("_") or "_"


def place_map(m: np.ndarray, crop_box: Iterable[int], orig_size: Iterable[int]) -> np.ndarray:
    """An ``S x S`` map on a canvas of the original photo's aspect ratio (float32, 0 outside
    the crop box), at the map's resolution inside the box.

    The canvas is the original ``(h, w)`` scaled by ``S / box width``; when the box lands on
    exactly ``S x S`` canvas pixels (the usual square center crop) the map is copied
    unchanged, else it is resized bilinearly to the box."""
    from PIL import Image

    m = np.nan_to_num(np.asarray(m, dtype=np.float32))
    s = m.shape[-1]
    left, top, right, bottom = (int(v) for v in crop_box)
    h, w = (int(v) for v in orig_size)
    if right <= left or bottom <= top:
        raise ValueError(f"empty crop box {tuple(crop_box)}")
    scale = s / (right - left)
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    y0, x0 = round(top * scale), round(left * scale)
    bh = max(1, min(round((bottom - top) * scale), ch - y0))
    bw = max(1, min(round((right - left) * scale), cw - x0))
    if (bh, bw) != m.shape:
        m = np.asarray(Image.fromarray(m, mode="F").resize((bw, bh), Image.BILINEAR))
    canvas = np.zeros((ch, cw), dtype=np.float32)
    canvas[y0 : y0 + bh, x0 : x0 + bw] = np.clip(m, 0.0, 1.0)
    return canvas


def export_fiftyone(
    reader: StoreReader,
    name: str,
    names: list[str],
    *,
    methods: list[str] | None = None,
    classes: Iterable[int] | None = None,
    status: str | None = None,
    limit: int | None = None,
    media_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Any:
    """Build the persistent FiftyOne dataset ``name`` of the store's finished rows; returns it.

    ``methods``: whose maps become ``fo.Heatmap`` fields, one per method named
    :func:`field_name` of it (default: the store's primary method). ``classes``: keep rows
    whose explained class (``target``) is one of these; ``status``: keep rows of this status
    (``OK``, ``DECODE_ERROR``, ...); ``limit``: at most this many rows (the first, by row id).
    Rows without a map (failed rows) get no heatmap but keep their status and error.
    """
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")  # no usage pings: runs offline
    import fiftyone as fo

    methods = list(methods or [reader.primary])
    for m in methods:
        if m not in reader.methods:
            raise ValueError(f"no maps of method {m!r} in {reader.path}; "
                             f"stored: {', '.join(reader.methods)}")  # fmt: skip
    want_status = _status_code(status)
    if fo.dataset_exists(name):
        if not overwrite:
            raise FileExistsError(f"FiftyOne dataset {name!r} exists (pass --overwrite to replace it)")
        fo.delete_dataset(name)
    fields = _field_names(reader, methods)
    media = Path(media_dir) if media_dir else Path(fo.config.default_dataset_dir) / name
    extra = _analysis_columns(reader)
    dataset = fo.Dataset(name)
    dataset.persistent = True
    dataset.info = {"store": reader.path, "methods": methods, "primary": reader.primary,
                    "pool": list(reader.pool), "fields": fields}  # fmt: skip
    want = None if classes is None else {int(c) for c in classes}
    batch: list[Any] = []
    n = 0
    for row, a in _rows(reader, want, want_status, limit):
        sample = fo.Sample(filepath=_filepath(reader, row, a, media))
        sample["row_id"] = row
        sample["uri"] = text(a["uri"])
        st = int(a["status"])
        sample["status"] = status_name(st)
        sample["error"] = text(a["error"])
        label, pred, target = int(a["label"]), int(a["predicted"]), int(a["target"])
        sample["target"] = target
        if label >= 0:
            sample["ground_truth"] = fo.Classification(label=class_name(names, label))
        if pred >= 0:
            conf = _num(a["prob"]) if pred == target else None
            sample["prediction"] = fo.Classification(label=class_name(names, pred),
                                                     confidence=conf)  # fmt: skip
        sample["prob"] = _num(a["prob"])
        if st == int(Status.OK):
            for m in methods:
                heat = place_map(reader.maps([row], method=m)[0], a["crop_box"], a["orig_size"])
                sample[fields[m]] = fo.Heatmap(map=heat, range=[0.0, 1.0])
        if reader.layout.has_pool:
            sel = int(a["selected"])
            sample["baseline_prob"] = _num(a["baseline_prob"])
            sample["selected"] = reader.pool[sel] if 0 <= sel < len(reader.pool) else None
            for j, p in enumerate(reader.pool):
                sample[fields[f"beta:{p}"]] = _num(a["beta"][j])
                if "selection_score" in a:
                    sample[fields[f"selection_score:{p}"]] = _num(a["selection_score"][j])
        for metric in reader.metric_paths():
            sample[fields[metric]] = _num(a[f"metric:{metric}"])
        if extra is not None:
            for key, value in extra.row(row).items():
                sample[key] = value
        batch.append(sample)
        n += 1
        if len(batch) >= 256:
            dataset.add_samples(batch, progress=False)
            batch = []
    if batch:
        dataset.add_samples(batch, progress=False)
    dataset.app_config.active_fields = _active_fields(["ground_truth", "prediction",
                                                       fields[methods[0]]])  # fmt: skip
    # the App colours a heatmap in its field's one colour unless given a colour scale
    dataset.app_config.color_scheme = fo.ColorScheme(
        colorscales=[{"path": fields[m], "name": "jet"} for m in methods]
    )
    dataset.save()
    return dataset


def _active_fields(paths: list[str]) -> Any:
    from fiftyone.core.odm.dataset import ActiveFields

    return ActiveFields(paths=paths)


def _field_names(reader: StoreReader, methods: list[str]) -> dict[str, str]:
    """Store name -> sample field, checked for collisions (two names, one field)."""
    out: dict[str, str] = {m: field_name(m) for m in methods}
    if reader.layout.has_pool:
        for p in reader.pool:
            out[f"beta:{p}"] = "beta_" + field_name(p)
            out[f"selection_score:{p}"] = "selection_score_" + field_name(p)
    for metric in reader.metric_paths():
        out[metric] = field_name(metric)
    fixed = {"row_id", "uri", "status", "error", "target", "ground_truth", "prediction", "prob",
             "baseline_prob", "selected", "filepath", "id", "tags", "metadata"}  # fmt: skip
    seen: dict[str, str] = {}
    for k, v in out.items():
        if v in seen or v in fixed or v in _ANALYSIS_FIELDS:
            raise ValueError(f"{k!r} and {seen.get(v, v)!r} would share the FiftyOne field {v!r}")
        seen[v] = k
    return out


def _rows(reader: StoreReader, classes: set[int] | None, status: int | None, limit: int | None
          ) -> Iterator[tuple[int, dict[str, Any]]]:  # fmt: skip
    """(row id, that row's per-row values) of the rows that pass the filters, unit by unit."""
    arrays = list(_ROW_ARRAYS)
    if reader.layout.has_pool:
        arrays += ["baseline_prob", "selected", "beta"]
        if "selection_score" in reader.score_names():
            arrays.append("selection_score")
    metric_paths = reader.metric_paths()
    arrays += list(metric_paths.values())
    n = 0
    for start, a in reader.iter_units(arrays):
        keep = np.ones(a["status"].shape[0], bool)
        if classes is not None:
            keep &= np.isin(a["target"], list(classes))
        if status is not None:
            keep &= a["status"] == status
        for i in np.nonzero(keep)[0].tolist():
            if limit is not None and n >= limit:
                return
            row = {k: a[k][i] for k in arrays}
            for metric, path in metric_paths.items():
                row[f"metric:{metric}"] = a[path][i]
            yield start + i, row
            n += 1


def _filepath(reader: StoreReader, row: int, a: dict[str, Any], media: Path) -> str:
    """The photo's local path, or a JPEG of it written under ``media`` (see module doc)."""
    uri = text(a["uri"])
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    if local and "://" not in local and "#" not in local and os.path.isfile(local):
        return os.path.abspath(local)
    stem = re.sub(r"[^0-9A-Za-z._-]+", "_", Path(uri.split("#")[-1]).stem)[:60] if uri else ""
    out = media / (f"{row:07d}_{stem}.jpg" if stem else f"{row:07d}.jpg")
    if not out.is_file():
        media.mkdir(parents=True, exist_ok=True)
        try:
            image = reader.original_image(row)
        except Exception as e:  # a row that failed to decode in the run fails here too
            if int(a["status"]) == int(Status.OK):
                raise ValueError(f"row {row} ({uri}): cannot read the original: {e}") from None
            return str(out)  # FiftyOne shows a missing-media sample; status says why
        image.convert("RGB").save(out, format="JPEG", quality=92)
    return str(out)


#: Per-row analysis fields (besides the descriptors and localisation scores).
_ANALYSIS_FIELDS = {"described", "group", "strategy", "strategy_distance", "clever_hans",
                    "clever_hans_candidate", "spearman", "top_iou"}  # fmt: skip
_DESCRIBED = {0: "NO_MAP", 1: "DESCRIBED", 2: "BAD_MAP", 255: "NOT_ANALYSED"}


class _Analysis:
    """The analysis' per-row columns, read whole (one small array per column)."""

    def __init__(self, results: Any) -> None:
        rows = results.rows
        self.names = [n for n in rows.array_keys() if n != "thumbs"]
        if results.compare is not None:
            self.names += [n for n in ("spearman", "top_iou") if n in results.compare]
        self.cols = results.row_columns(self.names)
        self.groups = results.group_names()
        table = {g["group"]: g for g in results.group_table()}
        self.clever_hans = [float(table[g]["clever_hans"]) for g in self.groups]
        self.ch_strategy = [results.strategies(g).clever_hans_strategy for g in self.groups]
        self.ch_k = [results.strategies(g).k for g in self.groups]

    def row(self, r: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if r >= len(self.cols["described"]):
            return out
        described = int(self.cols["described"][r])
        out["described"] = _DESCRIBED.get(described, str(described))
        gi = int(self.cols["group"][r]) if "group" in self.cols else -1
        strategy = int(self.cols["strategy"][r]) if "strategy" in self.cols else -1
        for n in self.names:
            if n in ("described", "group", "strategy"):
                continue
            out[n] = _num(self.cols[n][r]) if described == 1 or n in ("spearman", "top_iou") \
                else None  # fmt: skip
        out["group"] = self.groups[gi] if 0 <= gi < len(self.groups) else None
        out["strategy"] = strategy if strategy >= 0 else None
        if 0 <= gi < len(self.groups):
            out["clever_hans"] = self.clever_hans[gi]
            out["clever_hans_candidate"] = bool(
                strategy >= 0 and self.ch_k[gi] > 1 and strategy == self.ch_strategy[gi]
            )
        return out


def _analysis_columns(reader: StoreReader) -> _Analysis | None:
    results = reader.analysis()
    if results is None or results.rows is None:
        return None
    return _Analysis(results)


def _status_code(status: str | None) -> int | None:
    if status is None:
        return None
    key = status.strip().upper()
    if key not in Status.__members__:
        raise ValueError(f"--status: unknown status {status!r}; one of "
                         f"{', '.join(Status.__members__)}")  # fmt: skip
    return int(Status[key])


def _num(v: Any) -> float | None:
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v


# ---------------------------------------------------------------------------- the CLI hook
def add_fiftyone_arguments(p: Any) -> None:
    """``unioncam export``'s FiftyOne options (``--fiftyone NAME`` and its filters)."""
    p.add_argument("--fiftyone", metavar="NAME", help="make the FiftyOne dataset NAME "
                   "(needs the fiftyone extra)")  # fmt: skip
    p.add_argument("--classes", help="--fiftyone: rows of these explained classes, e.g. 1,281-285")
    p.add_argument("--status", help="--fiftyone: rows of this status (OK, CORRUPT, ...)")
    p.add_argument("--media-dir", help="--fiftyone: where photos that are not local files "
                   "(s3://, inline, ...) are written as JPEGs (default: FiftyOne's dataset dir)")
    p.add_argument("--overwrite", action="store_true", help="--fiftyone: replace the dataset")


def fiftyone_command(a: Any, reader: StoreReader, names: list[str],
                     classes: list[int] | None) -> None:  # fmt: skip
    """``unioncam export STORE --fiftyone NAME``: make the dataset, say how to look at it."""
    try:
        import fiftyone  # noqa: F401
    except ImportError:
        raise ValueError("--fiftyone needs FiftyOne: pip install 'unioncam[fiftyone]'") from None
    ds = export_fiftyone(
        reader, a.fiftyone, names, methods=a.method.split(",") if a.method else None,
        classes=classes, status=a.status, limit=a.limit, media_dir=a.media_dir,
        overwrite=a.overwrite,
    )  # fmt: skip
    print(f"made FiftyOne dataset {a.fiftyone!r} ({len(ds)} samples); "
          f"look at it with: fiftyone app launch {a.fiftyone}")  # fmt: skip
