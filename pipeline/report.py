"""``unioncam report``: a Markdown faithfulness report with PNG figures.

Two sources:

* ``--images DIR`` — compute on the fly with :func:`pipeline.evaluate.compare_methods`:
  UnionCAM against Grad-CAM, Grad-CAM++, Score-CAM, Group-CAM, the denoised map L_den and
  the fused map L_fused, on the same images, with RISE insertion/deletion curves.
  Results are checkpointed per batch (``.npz`` in a cache folder), so an interrupted or
  time-budgeted run resumes where it stopped; images are processed in a seeded random
  order, so a run cut short by ``--time-budget`` reports a random subset, not the
  alphabetically first classes.
* ``--store STORE`` — summarise what a pipeline run stored: the per-image
  ``metrics/<name>`` arrays (selected map, and every pool member with
  ``insertion@<member>``), which member was selected how often, per-class means, and a
  gallery of stored maps placed on the original photos (via the stored ``crop_box``).
  Read unit by unit: only the per-image scalars and the gallery's few maps are loaded.

What the report contains: a table of mean insertion ↑, deletion ↓ and insertion − deletion
↑ per method with 95% bootstrap confidence intervals; a *paired* bootstrap of every
method's difference to UnionCAM (same resampled images for both, which is what tells
"better on these images" apart from noise) with how often UnionCAM wins per image; a
plain-language list of where UnionCAM does **not** win; mean insertion and deletion
curves; how often each pool member was selected; and a gallery.

Why bootstrap: per-image AUCs are far from normal (many near 0 or 1), and the methods are
compared on the same images, so a percentile bootstrap over images — paired for the
differences — is the simplest honest interval. Above 50,000 images a normal approximation
is used instead (the bootstrap would cost minutes and agrees there); the report says which.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluate import INS_DEL_METRICS, METHOD_LABELS, METHODS, parse_metric_name

__all__ = [
    "GalleryItem",
    "ReportError",
    "ReportSample",
    "add_report_arguments",
    "bootstrap_ci",
    "build_report",
    "main",
    "paired_bootstrap",
    "report_command",
    "summarize_store",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: Above this many images the CIs use the normal approximation (see module docstring).
EXACT_BOOTSTRAP_MAX = 50_000
METRIC_TITLES = {
    "insertion": "insertion ↑",
    "deletion": "deletion ↓",
    "ins_minus_del": "ins − del ↑",
}
#: +1: higher is better, -1: lower is better.
METRIC_SIGN = {"insertion": 1, "deletion": -1, "ins_minus_del": 1}
CACHE_VERSION = 1


class ReportError(ValueError):
    """A bad report input (folder, store, setting); the message is one line."""


# ---------------------------------------------------------------------------------------
# Statistics
def _finite(values: Any) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return v[np.isfinite(v)]


def bootstrap_ci(
    values: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap CI ``(mean, low, high)`` of the finite ``values``.

    Resamples images with replacement ``n_boot`` times (seeded: the same ``seed`` and
    number of values give the same resamples, which makes separate calls *paired*). One
    value gives ``(v, nan, nan)``, none ``(nan, nan, nan)``. Above
    :data:`EXACT_BOOTSTRAP_MAX` values: mean ± z·sd/√n.
    """
    v = _finite(values)
    n = v.size
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if n == 1:
        return mean, math.nan, math.nan
    if not 0 < level < 1:
        raise ReportError(f"level must be in (0, 1), got {level}")
    alpha = (1 - level) / 2
    if n > EXACT_BOOTSTRAP_MAX:
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1 - alpha)
        half = z * float(v.std(ddof=1)) / math.sqrt(n)
        return mean, mean - half, mean + half
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    per = max(1, 4_000_000 // n)  # resamples per draw: bounded memory
    for a in range(0, n_boot, per):
        b = min(n_boot, a + per)
        means[a:b] = v[rng.integers(0, n, size=(b - a, n))].mean(1)
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return mean, float(lo), float(hi)


def paired_bootstrap(
    a: Any, b: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a − b`` over images where both are finite, with its bootstrap CI."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ReportError(f"paired_bootstrap: {a.size} values against {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    return bootstrap_ci(a[ok] - b[ok], n_boot=n_boot, level=level, seed=seed)


# ---------------------------------------------------------------------------------------
# What a report is made of
@dataclass
class GalleryItem:
    """One gallery row: the crop the model saw and every method's map on it."""

    title: str
    image: np.ndarray | None  # H x W x 3 uint8 (None: original not available)
    maps: dict[str, np.ndarray]  # method -> H x W in [0, 1]
    scores: dict[str, float] = field(default_factory=dict)  # method -> ins − del


@dataclass
class ReportSample:
    """Per-image results, from either source, that the figures and tables are made of."""

    source: str  # "images" or "store"
    methods: list[str]  # display order; ``reference`` first
    labels: dict[str, str]  # method -> display name
    reference: str
    scores: dict[str, dict[str, np.ndarray]]  # method -> metric -> N values (NaN = missing)
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # method -> (insertion N×S+1, deletion)
    selection_counts: dict[str, int]
    classes: np.ndarray
    names: list[str]
    provenance: dict[str, Any]
    gallery: list[GalleryItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    per_class: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.classes.shape[0])


def _class_names() -> list[str]:
    try:
        from pipeline.cli import load_class_names

        return load_class_names()
    except Exception:  # names are decoration; never fail a report for them
        return []


def _cname(names: list[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else str(c)


# ---------------------------------------------------------------------------------------
# Source 1: an image folder, computed on the fly
@dataclass(frozen=True)
class _Item:
    path: Path
    label: int | None
    name: str


def _list_images(image_dir: Path) -> list[_Item]:
    """Images of a folder: in ``labels.csv`` order when there is one (``file`` column,
    optional ``class_index``), else every image file below the folder, sorted."""
    import csv

    if not image_dir.is_dir():
        raise ReportError(f"--images: {image_dir} is not a folder")
    labels_csv = image_dir / "labels.csv"
    items: list[_Item] = []
    if labels_csv.is_file():
        with open(labels_csv, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "file" not in reader.fieldnames:
                raise ReportError(f"{labels_csv}: needs a 'file' column")
            for i, row in enumerate(reader):
                p = image_dir / row["file"]
                lab = row.get("class_index") or row.get("label") or ""
                try:
                    label = int(lab) if lab.strip() else None
                except ValueError:
                    raise ReportError(
                        f"{labels_csv} row {i + 2}: class_index {lab!r} is not an integer"
                    ) from None
                items.append(_Item(p, label, row["file"]))
    else:
        for p in sorted(image_dir.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
                items.append(_Item(p, None, str(p.relative_to(image_dir))))
    if not items:
        raise ReportError(
            f"--images: no images in {image_dir} (extensions {', '.join(IMAGE_EXTS)})"
        )
    return items


def _load_image(path: Path):
    """Decode with the pipeline's decoder (EXIF, CMYK, 16-bit, truncation → clear errors)."""
    from pipeline.decode import DecodeError, decode_image, read_bytes

    try:
        return decode_image(read_bytes(str(path)), uri=str(path))
    except DecodeError as e:
        raise ReportError(f"{path}: {e}") from None


def _cache_key(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[report] {msg}", file=sys.stderr, flush=True)


def _images_sample(
    image_dir: Path,
    *,
    model: str,
    weights: str | None,
    layer: str | None,
    n: int | None,
    every: int,
    image_size: int,
    step: int,
    methods: Sequence[str],
    batch_size: int,
    chunk_size: int | None,
    groups: int,
    target: str,
    seed: int,
    cache_dir: Path,
    time_budget_s: float | None,
    progress: bool,
    gallery: int,
    device: str | None = None,
) -> ReportSample:
    import torch

    from pipeline.evaluate import compare_methods
    from unioncam import load_model, resolve_layer

    items = _list_images(image_dir)[::every]
    if n is not None:
        items = items[:n]
    if target == "label" and any(it.label is None for it in items):
        raise ReportError("--target label needs a labels.csv with class_index for every image")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        loaded = load_model(model, weights, device=dev)
    except ValueError as e:
        raise ReportError(" ".join(str(e).split())) from None
    net = loaded.model
    pre = loaded.preprocess
    if image_size != pre.crop_size:
        pre = pre.with_size(image_size)
    try:
        resolved = resolve_layer(
            net, layer or loaded.target_layer, torch.zeros(1, 3, image_size, image_size)
        )
    except ValueError as e:
        raise ReportError(f"--layer: {' '.join(str(e).split())}") from None
    layer_name = str(resolved)

    order = np.random.default_rng(seed).permutation(len(items))
    settings = {
        "version": CACHE_VERSION, "model": model, "weights": weights, "layer": layer_name,
        "image_size": image_size, "step": step, "methods": list(methods), "groups": groups,
        "target": target, "files": [it.name for it in items], "seed": seed,
        "batch_size": batch_size,
    }  # fmt: skip
    key = _cache_key(settings)
    cache = cache_dir / key
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "settings.json").write_text(json.dumps(settings, indent=1))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    t_start = time.perf_counter()
    spent: list[float] = []
    stopped_early = False
    for b, idx in enumerate(batches):
        path = cache / f"batch-{b:05d}.npz"
        if path.exists():
            continue
        elapsed = time.perf_counter() - t_start
        if time_budget_s is not None and spent and elapsed + np.mean(spent) > time_budget_s:
            stopped_early = True
            _log(progress, f"time budget {time_budget_s:.0f} s reached after {b} batches")
            break
        tb = time.perf_counter()
        xs, boxes, good, errors = [], [], [], []
        for i in idx.tolist():
            it = items[i]
            try:
                img = _load_image(it.path)
            except ReportError as e:
                errors.append(f"{it.name}: {e}")
                continue
            t, box = pre(img)
            xs.append(t)
            boxes.append(box)
            good.append(i)
        arrays: dict[str, np.ndarray] = {
            "index": np.asarray(good, dtype=np.int64),
            "crop_box": np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
            "errors": np.asarray(errors, dtype=str),
        }
        if good:
            x = torch.stack(xs).to(dev)
            targets = [items[i].label for i in good] if target == "label" else None
            c = compare_methods(
                net, x, targets=targets, layer=layer_name, methods=methods, step=step,
                chunk_size=chunk_size, groups=groups,
            )  # fmt: skip
            arrays.update(
                classes=c.classes, probs=c.probs, selected=c.selected,
                n_steps=np.asarray(c.n_steps), forwards_explain=np.asarray(c.forwards["explain"]),
                forwards_metrics=np.asarray(c.forwards["metrics"]),
            )  # fmt: skip
            for m, s in c.items():
                arrays[f"ins__{m}"] = s.insertion
                arrays[f"del__{m}"] = s.deletion
                arrays[f"icurve__{m}"] = s.insertion_curve
                arrays[f"dcurve__{m}"] = s.deletion_curve
                arrays[f"maps__{m}"] = s.maps.astype(np.float16)
        arrays["seconds"] = np.asarray(time.perf_counter() - tb)
        _atomic_savez(path, arrays)
        spent.append(float(arrays["seconds"]))
        done = sum(1 for j in range(len(batches)) if (cache / f"batch-{j:05d}.npz").exists())
        eta = np.mean(spent) * (len(batches) - done)
        _log(progress, f"batch {b + 1}/{len(batches)} ({len(good)} images) in "
             f"{spent[-1]:.0f} s; {done}/{len(batches)} done, ETA {eta / 60:.1f} min")  # fmt: skip

    device_text = str(dev) + (f", {torch.get_num_threads()} torch threads"
                               if dev.type == "cpu" else "")  # fmt: skip
    return _assemble_images(items, cache, len(batches), settings, loaded, pre, image_dir,
                            stopped_early, gallery, device_text)  # fmt: skip


def _assemble_images(
    items: list[_Item],
    cache: Path,
    n_batches: int,
    settings: dict[str, Any],
    loaded: Any,
    pre: Any,
    image_dir: Path,
    stopped_early: bool,
    gallery: int,
    device_text: str,
) -> ReportSample:
    """Gather the finished batches of the cache into a :class:`ReportSample`."""
    methods = list(settings["methods"])
    parts = []
    errors: list[str] = []
    for b in range(n_batches):
        p = cache / f"batch-{b:05d}.npz"
        if p.exists():
            with np.load(p) as z:
                part = {k: z[k] for k in z.files}
            errors += [str(e) for e in part["errors"].tolist()]
            if part["index"].size:
                parts.append(part)
    if not parts:
        raise ReportError(f"no image could be explained ({len(errors)} unreadable)"
                          + (f"; first: {errors[0]}" if errors else ""))  # fmt: skip

    def cat(k: str) -> np.ndarray:
        return np.concatenate([p[k] for p in parts])

    index = cat("index")
    scores, curves = {}, {}
    for m in methods:
        ins, dele = cat(f"ins__{m}").astype(np.float64), cat(f"del__{m}").astype(np.float64)
        scores[m] = {"insertion": ins, "deletion": dele, "ins_minus_del": ins - dele}
        curves[m] = (cat(f"icurve__{m}"), cat(f"dcurve__{m}"))
    classes = cat("classes")
    selected = cat("selected")
    n_steps = int(parts[0]["n_steps"])
    seconds = float(sum(float(p["seconds"]) for p in parts))
    fw_e = int(sum(int(p["forwards_explain"]) for p in parts))
    fw_m = int(sum(int(p["forwards_metrics"]) for p in parts))
    pool = ("region:scorecam", "fused:denoised+scorecam")
    counts = {}
    if "unioncam" in methods:
        counts = {p: int((selected == j).sum()) for j, p in enumerate(pool)}
    names = _class_names()
    reference = "unioncam" if "unioncam" in methods else methods[0]
    order = [reference] + [m for m in methods if m != reference]
    notes = []
    requested = len(items)
    if index.size < requested:
        why = "the time budget ran out" if stopped_early else "some images could not be read"
        notes.append(f"{index.size} of the {requested} requested images were explained "
                     f"({why}); rerun the same command to continue from the cache.")  # fmt: skip
    for e in errors:
        notes.append(f"skipped {e}")

    # Gallery: images spread over UnionCAM's advantage (from its clearest win to its
    # clearest loss against the best other method), so losses are shown too.
    g_rows: list[int] = []
    if gallery > 0:
        ref = scores[reference]["ins_minus_del"]
        others = [scores[m]["ins_minus_del"] for m in order[1:]]
        adv = ref - np.max(others, axis=0) if others else ref
        ranked = np.argsort(-adv, kind="stable")
        pick = np.unique(np.linspace(0, len(ranked) - 1, min(gallery, len(ranked))).round())
        g_rows = [int(ranked[int(i)]) for i in pick]
    maps = {m: cat(f"maps__{m}") for m in methods} if g_rows else {}
    boxes = cat("crop_box")
    g_items = []
    size = int(settings["image_size"])
    for r in g_rows:
        it = items[int(index[r])]
        try:
            img = _load_image(it.path)
            left, top, right, bottom = (int(v) for v in boxes[r])
            crop = img.crop((left, top, right, bottom)).resize((size, size))
            arr = np.asarray(crop.convert("RGB"))
        except Exception:
            arr = None
        c = int(classes[r])
        sel = ""
        if "unioncam" in methods:
            sel = f"; UnionCAM chose {'L_fused' if selected[r] == 1 else 'Score-CAM'}"
        g_items.append(GalleryItem(
            title=f"{Path(it.name).stem[:30]}; explained: {_cname(names, c)[:40]}{sel}",
            image=arr,
            maps={m: maps[m][r].astype(np.float32) for m in order},
            scores={m: float(scores[m]["ins_minus_del"][r]) for m in order},
        ))  # fmt: skip

    labels = np.asarray([items[int(i)].label if items[int(i)].label is not None else -1
                         for i in index])  # fmt: skip
    prov = {
        "source": f"image folder {image_dir}",
        "model": f"{settings['model']} ({loaded.weights or 'default weights'})",
        "layer": settings["layer"],
        "image_size": size,
        "preprocess": f"resize {pre.resize_size}, center crop {pre.crop_size}",
        "target": settings["target"],
        "images": f"{index.size} (of {len(items)} requested)",
        "rise_step": f"{settings['step']} px per step ({n_steps} steps)",
        "groups": settings["groups"],
        "compute_seconds": round(seconds, 1),
        "forwards": f"{fw_e} to explain, {fw_m} for the metrics",
        "device": device_text,
    }
    if np.any(labels >= 0):
        prov["top1_accuracy"] = f"{float((classes == labels)[labels >= 0].mean()):.3f}"
    return ReportSample(
        source="images",
        methods=order,
        labels={m: METHOD_LABELS.get(m, m) for m in order},
        reference=reference,
        scores=scores,
        curves=curves,
        selection_counts=counts,
        classes=classes,
        names=[items[int(i)].name for i in index],
        provenance=prov,
        gallery=g_items,
        notes=notes,
        per_class=[],
    )


# ---------------------------------------------------------------------------------------
# Source 2: a pipeline store
_MEMBER_LABELS = {
    "region:scorecam": "Score-CAM (pool)",
    "region:groupcam": "Group-CAM (pool)",
}


def _member_label(member: str) -> str:
    if member in _MEMBER_LABELS:
        return _MEMBER_LABELS[member]
    kind, _, what = member.partition(":")
    if kind == "fused":
        return f"Fused {what} (pool)"
    if kind == "gradient":
        return f"{METHOD_LABELS.get(what, what)} (pool)"
    return member


def _by_class(
    classes: np.ndarray, values: dict[str, np.ndarray], selected: np.ndarray, pool: Sequence[str]
) -> list[dict[str, Any]]:
    """Per class: count, NaN-skipping mean of every value array, selection counts.

    One pass of ``bincount`` per array (not one mask per class), so ImageNet-train's 1.28 M
    rows x 1000 classes stay a second's work.
    """
    if classes.size == 0:
        return []
    uniq, inv = np.unique(classes, return_inverse=True)
    k = uniq.size
    n = np.bincount(inv, minlength=k)
    means = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        fin = np.isfinite(v)
        tot = np.bincount(inv[fin], weights=v[fin], minlength=k)
        cnt = np.bincount(inv[fin], minlength=k)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[name] = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    sel = np.zeros((k, len(pool)), dtype=np.int64)
    good = (selected >= 0) & (selected < len(pool))
    np.add.at(sel, (inv[good], selected[good]), 1)
    return [
        {
            "class": int(uniq[i]),
            "n": int(n[i]),
            "metrics": {name: float(m[i]) for name, m in means.items()},
            "selection": {p: int(sel[i, j]) for j, p in enumerate(pool)},
        }
        for i in range(k)
    ]


def summarize_store(
    store: str,
    *,
    by: str = "class_explained",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Overall and per-class means of every stored metric and the selection counts.

    Reads the per-image scalars unit by unit (finished units only, OK rows only); no maps.
    Returns ``{"n", "metrics": {name: mean}, "selection": {member: count},
    "per_class": [{"class", "n", "metrics": {...}, "selection": {...}}]}`` — the summary
    ``unioncam query`` can print.
    """
    data = _read_store_scalars(store, by=by, storage_options=storage_options)
    pool = data["pool"]
    ok = data["ok"]
    out: dict[str, Any] = {"n": int(ok.sum()), "metrics": {}, "selection": {}, "per_class": []}
    for name, v in data["metrics"].items():
        out["metrics"][name] = float(np.nanmean(v[ok])) if ok.any() else math.nan
    sel = data["selected"][ok]
    out["selection"] = {p: int((sel == j).sum()) for j, p in enumerate(pool)}
    metrics_ok = {k: v[ok] for k, v in data["metrics"].items()}
    out["per_class"] = _by_class(data["by"][ok], metrics_ok, sel, pool)
    return out


def _read_store_scalars(
    store: str, *, by: str = "class_explained", storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    from pipeline.decode import Status
    from pipeline.store import StoreError, done_units, open_store, read_layout

    if by not in ("class_explained", "label", "predicted"):
        raise ReportError(f"by must be class_explained, label or predicted, got {by!r}")
    try:
        layout = read_layout(store, storage_options)
        group = open_store(store, "r", storage_options)
    except StoreError as e:
        raise ReportError(str(e)) from None
    done = sorted(done_units(store, storage_options))
    names = list(layout.metrics)
    from pipeline.store import safe_name  # the store's own name mapping

    paths = {n: f"metrics/{safe_name(n)}" for n in names}
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("status", "selected", "prob", by)}
    cols.update({n: [] for n in names})
    rows: list[np.ndarray] = []
    for u in done:
        start, stop = layout.unit_range(u)
        rows.append(np.arange(start, stop))
        for k in ("status", "selected", "prob", by):
            cols[k].append(np.asarray(group[k][start:stop]))
        for n in names:
            cols[n].append(np.asarray(group[paths[n]][start:stop], dtype=np.float64))

    def cat(k: str, dtype: Any) -> np.ndarray:
        return np.concatenate(cols[k]) if cols[k] else np.zeros(0, dtype=dtype)

    status = cat("status", np.uint8)
    return {
        "layout": layout,
        "group": group,
        "pool": tuple(layout.pool),
        "rows": np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
        "ok": status == int(Status.OK),
        "status": status,
        "selected": cat("selected", np.int64).astype(np.int64),
        "prob": cat("prob", np.float32),
        "by": cat(by, np.int64).astype(np.int64),
        "metrics": {n: cat(n, np.float64) for n in names},
        "units_done": len(done),
    }


def _store_sample(
    store: str,
    *,
    storage_options: dict[str, Any] | None,
    gallery: int,
    seed: int,
    by: str,
) -> ReportSample:
    from pipeline.store import safe_name

    d = _read_store_scalars(store, by=by, storage_options=storage_options)
    layout, group, pool, ok = d["layout"], d["group"], d["pool"], d["ok"]
    if not ok.any():
        raise ReportError(
            f"store {store}: no explained images yet ({d['units_done']} of "
            f"{layout.num_units} units done)"
        )
    attrs = dict(group.attrs)
    rows = d["rows"][ok]
    metrics = {k: v[ok] for k, v in d["metrics"].items()}

    # method -> metric -> values: "unioncam" = the selected map, then every pool member.
    table: dict[str, dict[str, np.ndarray]] = {}
    for name, v in metrics.items():
        metric, member = parse_metric_name(name)
        if metric not in INS_DEL_METRICS:
            continue
        table.setdefault(member or "unioncam", {})[metric] = v
    for vals in table.values():
        if "ins_minus_del" not in vals and {"insertion", "deletion"} <= set(vals):
            vals["ins_minus_del"] = vals["insertion"] - vals["deletion"]
    methods = (["unioncam"] if "unioncam" in table else []) + [p for p in pool if p in table]
    labels = {m: ("UnionCAM (selected)" if m == "unioncam" else _member_label(m)) for m in methods}
    notes = []
    if not methods:
        notes.append("This store has no insertion/deletion metrics: run with "
                     "`--metrics insertion,deletion,ins_minus_del` (and "
                     "`--metrics-all-members` to score every pool member).")  # fmt: skip
    elif len(methods) == 1:
        notes.append("Only the selected map was scored; `--metrics-all-members` also scores "
                     "every pool member, which gives the paired comparison.")  # fmt: skip
    notes.append("A store holds only UnionCAM's pool; for Grad-CAM, Grad-CAM++, Group-CAM "
                 "etc. on the same images use `unioncam report --images DIR` (computed on the "
                 "fly). Curves are not stored, only their areas.")  # fmt: skip
    other = {k: v for k, v in metrics.items() if parse_metric_name(k)[0] not in INS_DEL_METRICS}
    for k, v in other.items():
        notes.append(
            f"stored metric `{k}`: mean {np.nanmean(v):.4f} over {np.isfinite(v).sum()} images"
        )
    sel = d["selected"][ok]
    counts = {p: int((sel == j).sum()) for j, p in enumerate(pool)}
    classes = d["by"][ok]
    cnames = _class_names()

    per_class = []
    if methods:
        ref = table[methods[0]]
        for r in _by_class(classes, {k: ref[k] for k in INS_DEL_METRICS if k in ref}, sel, pool):
            per_class.append({
                "class": r["class"], "name": _cname(cnames, r["class"]), "n": r["n"],
                **r["metrics"], "selected": r["selection"],
            })  # fmt: skip
        per_class.sort(key=lambda r: (-r["n"], r["class"]))

    # Gallery: seeded choice of OK rows; stored maps (and components if stored) on the crop.
    g_items = []
    if gallery > 0:
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(rows.size, size=min(gallery, rows.size), replace=False))
        comps = [c for c in layout.components if f"components/{safe_name(c)}" in group]
        reader = None
        try:
            from pipeline.query import open_reader

            reader = open_reader(store, storage_options)
        except Exception as e:
            notes.append(f"gallery without photos: {' '.join(str(e).split())}")
        missing_photo = 0
        for j in pick.tolist():
            r = int(rows[j])
            box = tuple(int(v) for v in np.asarray(group["crop_box"][r]))
            h, w = layout.map_size
            arr = None
            if reader is not None:
                try:
                    img = reader.original_image(r)
                    arr = np.asarray(img.crop(box).resize((w, h)).convert("RGB"))
                except Exception:
                    missing_photo += 1
            maps = {"unioncam": np.asarray(group["maps"][r], dtype=np.float32)}
            for c in comps:
                maps[c] = np.asarray(group[f"components/{safe_name(c)}"][r], dtype=np.float32)
            s = int(sel[j])
            c = int(classes[j])
            g_items.append(GalleryItem(
                title=f"row {r}: {_cname(cnames, c)[:40]}; selected: "
                      f"{pool[s] if 0 <= s < len(pool) else '?'}",
                image=arr,
                maps=maps,
                scores={m: float(table[m]["ins_minus_del"][j]) for m in methods
                        if m in maps and "ins_minus_del" in table[m]},
            ))  # fmt: skip
        if missing_photo:
            notes.append(f"{missing_photo} gallery photos could not be read (manifest "
                         f"{attrs.get('manifest')!r}); their maps are shown alone.")  # fmt: skip
        for m in [k for it in g_items for k in it.maps]:
            labels.setdefault(m, _member_label(m) if m != "unioncam" else "UnionCAM")

    summary = attrs.get("summary") or {}
    prov = {
        "source": f"store {store}",
        "model": f"{attrs.get('model')} ({attrs.get('weights')})",
        "layer": attrs.get("layer"),
        "image_size": attrs.get("image_size"),
        "target": attrs.get("target"),
        "pool": ", ".join(pool),
        "images": f"{int(ok.sum())} explained of {layout.num_rows} rows "
                  f"({d['units_done']} of {layout.num_units} units done)",
        "metrics_stored": ", ".join(layout.metrics) or "none",
    }  # fmt: skip
    cfg = attrs.get("config") or {}
    if cfg.get("metric_step"):
        prov["rise_step"] = f"{cfg['metric_step']} px per step"
    if summary.get("wall_s") is not None:
        prov["run_wall_seconds"] = summary.get("wall_s")
    return ReportSample(
        source="store",
        methods=methods,
        labels=labels,
        reference=methods[0] if methods else "unioncam",
        scores=table,
        curves={},
        selection_counts=counts,
        classes=classes,
        names=[str(r) for r in rows.tolist()],
        provenance=prov,
        gallery=g_items,
        notes=notes,
        per_class=per_class,
    )


# ---------------------------------------------------------------------------------------
# Statistics table
def _stats(sample: ReportSample, n_boot: int, seed: int) -> dict[str, Any]:
    """Per method and metric: mean with CI; paired difference to the reference."""
    out: dict[str, Any] = {"methods": {}, "paired": {}, "n_boot": n_boot,
                           "ci": "normal approximation" if sample.n > EXACT_BOOTSTRAP_MAX
                           else f"percentile bootstrap over images, {n_boot} resamples"}  # fmt: skip
    ref = sample.scores.get(sample.reference, {})
    for m in sample.methods:
        out["methods"][m] = {}
        for k in INS_DEL_METRICS:
            if k in sample.scores[m]:
                mean, lo, hi = bootstrap_ci(sample.scores[m][k], n_boot=n_boot, seed=seed)
                out["methods"][m][k] = {"mean": mean, "low": lo, "high": hi,
                                        "n": int(_finite(sample.scores[m][k]).size)}  # fmt: skip
        if m == sample.reference:
            continue
        out["paired"][m] = {}
        for k in INS_DEL_METRICS:
            if k in sample.scores[m] and k in ref:
                a, b = ref[k], sample.scores[m][k]
                mean, lo, hi = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
                ok = np.isfinite(a) & np.isfinite(b)
                better = (a[ok] - b[ok]) * METRIC_SIGN[k]
                ties = float((better == 0).mean()) if ok.any() else math.nan
                wins = float((better > 0).mean()) if ok.any() else math.nan
                s = METRIC_SIGN[k]
                verdict, direction = "too few images", 0
                if math.isfinite(lo) and math.isfinite(hi):
                    lo_s, hi_s = sorted((s * lo, s * hi))
                    direction = 1 if lo_s > 0 else -1 if hi_s < 0 else 0
                    verdict = {1: f"{sample.labels[sample.reference]} better",
                               -1: f"{sample.labels[m]} better",
                               0: "no clear difference"}[direction]  # fmt: skip
                out["paired"][m][k] = {"mean": mean, "low": lo, "high": hi, "wins": wins,
                                       "ties": ties, "verdict": verdict,
                                       "direction": direction}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_COLORS = {
    "unioncam": "#d62728", "faithful": "#e377c2", "gradcam": "#1f77b4", "gradcam++": "#17becf", "scorecam": "#2ca02c",
    "groupcam": "#9467bd", "denoised": "#ff7f0e", "fused": "#8c564b",
}  # fmt: skip


def _color(m: str, i: int) -> str:
    return _COLORS.get(m) or f"C{i % 10}"


def _fig_scores(sample: ReportSample, stats: dict[str, Any], path: Path) -> None:
    plt = _plt()
    metrics = [k for k in INS_DEL_METRICS if any(k in stats["methods"][m] for m in sample.methods)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 0.45 * len(sample.methods) + 1.3),
                             sharey=True, squeeze=False)  # fmt: skip
    ylab = [sample.labels[m] for m in sample.methods]
    y = np.arange(len(sample.methods))[::-1]
    for ax, k in zip(axes[0], metrics, strict=True):
        for i, m in enumerate(sample.methods):
            s = stats["methods"][m].get(k)
            if not s:
                continue
            err = None
            if math.isfinite(s["low"]):
                err = [[s["mean"] - s["low"]], [s["high"] - s["mean"]]]
            ax.barh(y[i], s["mean"], xerr=err, color=_color(m, i), alpha=0.85, capsize=3)
        ax.set_title(METRIC_TITLES[k], fontsize=10)
        ax.axvline(0, color="k", lw=0.5)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y)
    axes[0][0].set_yticklabels(ylab, fontsize=8)
    fig.suptitle(f"Mean per image with 95% CI (n = {sample.n})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fig_curves(sample: ReportSample, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, m in enumerate(sample.methods):
        if m not in sample.curves:
            continue
        for ax, curve in zip(axes, sample.curves[m], strict=True):
            c = np.asarray(curve, dtype=np.float64)
            x = np.linspace(0, 1, c.shape[1])
            ref = m == sample.reference
            ax.plot(
                x,
                c.mean(0),
                color=_color(m, i),
                lw=2.4 if ref else 1.2,
                ls="--" if ref else "-",
                zorder=3 if ref else 2,
                label=sample.labels[m],
            )
    for ax, t in zip(
        axes, ("Insertion (blurred → image)", "Deletion (image → zeros)"), strict=True
    ):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("fraction of pixels, most salient first", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean p(class explained)", fontsize=9)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fig_selection(sample: ReportSample, path: Path) -> None:
    plt = _plt()
    names = list(sample.selection_counts)
    vals = [sample.selection_counts[k] for k in names]
    total = max(1, sum(vals))
    fig, ax = plt.subplots(figsize=(5.5, 0.45 * len(names) + 1.2))
    y = np.arange(len(names))[::-1]
    ax.barh(y, vals, color="#d62728", alpha=0.8)
    for yi, v in zip(y, vals, strict=True):
        ax.text(v, yi, f" {v} ({100 * v / total:.0f}%)", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlim(0, max(vals + [1]) * 1.3)
    ax.set_xlabel("images", fontsize=9)
    ax.set_title("Which pool member UnionCAM selected", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fig_distribution(sample: ReportSample, path: Path) -> None:
    plt = _plt()
    ms = [m for m in sample.methods if "ins_minus_del" in sample.scores[m]]
    data = [_finite(sample.scores[m]["ins_minus_del"]) for m in ms]
    fig, ax = plt.subplots(figsize=(1.1 * len(ms) + 2.5, 3.2))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(np.arange(1, len(ms) + 1))
    ax.set_xticklabels([sample.labels[m] for m in ms], rotation=25, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("insertion − deletion per image", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _wrap(title: str, width: int = 34) -> str:
    """Row titles wrapped to the photo's column (they must not run into the map titles)."""
    import textwrap

    lines = []
    for part in title.split("; "):
        lines += textwrap.wrap(part, width) or [""]
    return "\n".join(lines[:3])


def _fig_gallery(sample: ReportSample, path: Path) -> None:
    from pipeline.query import colorize

    plt = _plt()
    cols = []
    for it in sample.gallery:
        cols += [m for m in it.maps if m not in cols]
    rows = len(sample.gallery)
    ncol = 1 + len(cols)
    fig, axes = plt.subplots(rows, ncol, figsize=(1.45 * max(ncol, 3), 1.85 * rows), squeeze=False)
    for r, it in enumerate(sample.gallery):
        ax = axes[r][0]
        if it.image is not None:
            ax.imshow(it.image)
        else:
            ax.text(0.5, 0.5, "photo\nunavailable", ha="center", va="center", fontsize=7)
        ax.set_title(_wrap(it.title), fontsize=6, loc="left")
        for c, m in enumerate(cols, start=1):
            ax = axes[r][c]
            mp = it.maps.get(m)
            if mp is not None:
                heat = colorize(mp).astype(np.float32)
                if it.image is not None and it.image.shape[:2] == heat.shape[:2]:
                    heat = 0.5 * heat + 0.5 * it.image.astype(np.float32)
                ax.imshow(heat.astype(np.uint8))
                sc = it.scores.get(m)
                if sc is not None and math.isfinite(sc):
                    ax.set_xlabel(f"ins−del {sc:+.3f}", fontsize=6, labelpad=1)
            if r == 0:
                ax.set_title(sample.labels.get(m, m), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    fig.tight_layout(pad=0.3, h_pad=0.6, w_pad=0.2)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Markdown
def _fmt_ci(s: dict[str, float]) -> str:
    if not math.isfinite(s["mean"]):
        return "–"
    if not math.isfinite(s["low"]):
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def _fmt_diff(s: dict[str, float]) -> str:
    if not math.isfinite(s["mean"]):
        return "–"
    if not math.isfinite(s["low"]):
        return f"{s['mean']:+.3f}"
    return f"{s['mean']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]"


def _findings(sample: ReportSample, stats: dict[str, Any]) -> list[str]:
    """Plain sentences: where the reference wins, ties and loses (by the paired CI)."""
    ref = sample.labels.get(sample.reference, sample.reference)
    lines = []
    for k in INS_DEL_METRICS:
        win, lose, tie = [], [], []
        for m, per in stats["paired"].items():
            if k not in per:
                continue
            d = per[k]["direction"]
            (win if d > 0 else lose if d < 0 else tie).append(sample.labels[m])
        if not (win or lose or tie):
            continue
        parts = []
        if win:
            parts.append(f"better than {', '.join(win)}")
        if tie:
            parts.append(f"not distinguishable from {', '.join(tie)}")
        if lose:
            parts.append(f"**worse than {', '.join(lose)}**")
        lines.append(f"- {METRIC_TITLES[k]}: {ref} is " + "; ".join(parts) + ".")
    means = {m: stats["methods"][m].get("ins_minus_del", {}).get("mean", math.nan)
             for m in sample.methods}  # fmt: skip
    finite = {m: v for m, v in means.items() if math.isfinite(v)}
    if finite:
        best = max(finite, key=lambda m: finite[m])
        text = f"- Highest mean insertion − deletion: {sample.labels[best]} ({finite[best]:.3f})"
        if best != sample.reference:
            text += f"; {ref}: {finite.get(sample.reference, math.nan):.3f}"
        lines.append(text + ".")
    return lines


def _markdown(sample: ReportSample, stats: dict[str, Any], figs: dict[str, str],
              title: str, command: str | None) -> str:  # fmt: skip
    ref = sample.labels.get(sample.reference, sample.reference)
    L = [f"# {title}", ""]
    L.append(f"Generated {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} by "
             "`unioncam report`.")  # fmt: skip
    if command:
        L += ["", "Regenerate with:", "", "```bash", command, "```"]
    L += ["", "## Setup", "", "| setting | value |", "|---|---|"]
    for k, v in sample.provenance.items():
        L.append(f"| {k.replace('_', ' ')} | {v} |")
    L += ["", "Insertion: the class probability while the most salient pixels are put back "
          "onto a blurred copy (higher is better); deletion: while they are replaced by the "
          "mean colour (lower is better); both are areas under the curve in [0, 1] (RISE, "
          "Petsiuk et al. 2018). CI: " + stats["ci"] + "."]  # fmt: skip
    if sample.methods:
        L += ["", "## Faithfulness per method", "",
              "| method | n | " + " | ".join(f"{METRIC_TITLES[k]} (95% CI)" for k in INS_DEL_METRICS) + " |",
              "|---|---:|" + "---:|" * len(INS_DEL_METRICS)]  # fmt: skip
        for m in sample.methods:
            st = stats["methods"][m]
            n = max((v["n"] for v in st.values()), default=0)
            cells = [_fmt_ci(st[k]) if k in st else "–" for k in INS_DEL_METRICS]
            name = f"**{sample.labels[m]}**" if m == sample.reference else sample.labels[m]
            L.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
        if stats["paired"]:
            L += ["", f"### Paired differences: {ref} − method", "",
                  f"Same images for both; positive is better for {ref} on insertion and "
                  f"ins − del, negative is better on deletion. \"wins\": share of images where "
                  f"{ref} is strictly better. Intervals are per comparison (not corrected for "
                  f"the {3 * len(stats['paired'])} comparisons in this table).", "",
                  "| method | Δ insertion [95% CI] | wins | Δ deletion [95% CI] | wins | "
                  "Δ ins − del [95% CI] | wins | verdict (ins − del) |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
            for m, per in stats["paired"].items():
                cells = []
                for k in INS_DEL_METRICS:
                    if k in per:
                        w, t = per[k]["wins"], per[k]["ties"]
                        tied = f" ({100 * t:.0f}% tied)" if t > 0.005 else ""
                        cells += [_fmt_diff(per[k]), f"{100 * w:.0f}%{tied}"]
                    else:
                        cells += ["–", "–"]
                verdict = per.get("ins_minus_del", {}).get("verdict", "–")
                L.append(f"| {sample.labels[m]} | " + " | ".join(cells) + f" | {verdict} |")
        L += ["", "### What this shows", ""] + _findings(sample, stats)
    if "scores" in figs:
        L += ["", f"![mean scores with 95% CI]({figs['scores']})"]
    if "curves" in figs:
        L += ["", "## Mean insertion and deletion curves", "",
              f"![mean insertion and deletion curves]({figs['curves']})"]  # fmt: skip
    if "distribution" in figs:
        L += ["", "## Per-image spread", "",
              f"![insertion minus deletion per image]({figs['distribution']})"]  # fmt: skip
    if sample.selection_counts:
        total = max(1, sum(sample.selection_counts.values()))
        L += ["", "## Which pool member was selected", "", "| pool member | images | share |",
              "|---|---:|---:|"]  # fmt: skip
        for k, v in sample.selection_counts.items():
            L.append(f"| {k} | {v} | {100 * v / total:.0f}% |")
        if "selection" in figs:
            L += ["", f"![selection frequency]({figs['selection']})"]
    if sample.per_class:
        top = sample.per_class[:15]
        L += ["", f"## Per class ({ref}; the {len(top)} largest of {len(sample.per_class)} classes)",
              "", "| class | name | n | insertion | deletion | ins − del | selected |",
              "|---:|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in top:
            sel = ", ".join(f"{k}: {v}" for k, v in r["selected"].items() if v)
            L.append(f"| {r['class']} | {r['name']} | {r['n']} | {r.get('insertion', math.nan):.3f} | "
                     f"{r.get('deletion', math.nan):.3f} | {r.get('ins_minus_del', math.nan):.3f} | {sel} |")  # fmt: skip
    if "gallery" in figs:
        L += ["", "## Gallery", "",
              "The crop the model saw, then each method's map on it, with that image's "
              "insertion − deletion." + (" Rows run from UnionCAM's clearest win to its clearest "
              "loss against the best other method." if sample.source == "images" else ""),
              "", f"![gallery]({figs['gallery']})"]  # fmt: skip
    if sample.notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in sample.notes]
    return "\n".join(L) + "\n"


def _render(sample: ReportSample, out: Path, *, n_boot: int, seed: int, title: str,
            command: str | None) -> Path:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    stats = _stats(sample, n_boot, seed)
    if 1 < sample.n < 20 and sample.methods:
        sample.notes.insert(0, f"With n = {sample.n} images the percentile bootstrap intervals "
                            "are optimistic (too narrow); read the verdicts as indicative.")  # fmt: skip
    figs: dict[str, str] = {}
    if sample.methods:
        _fig_scores(sample, stats, out / "scores.png")
        figs["scores"] = "scores.png"
        _fig_distribution(sample, out / "distribution.png")
        figs["distribution"] = "distribution.png"
    if sample.curves:
        _fig_curves(sample, out / "curves.png")
        figs["curves"] = "curves.png"
    if sample.selection_counts:
        _fig_selection(sample, out / "selection.png")
        figs["selection"] = "selection.png"
    if sample.gallery:
        _fig_gallery(sample, out / "gallery.png")
        figs["gallery"] = "gallery.png"
    md = _markdown(sample, stats, figs, title, command)
    path = out / "report.md"
    path.write_text(md, encoding="utf-8")
    summary = {
        "source": sample.source, "n": sample.n, "reference": sample.reference,
        "labels": sample.labels, "provenance": sample.provenance, "stats": stats,
        "selection_counts": sample.selection_counts, "notes": sample.notes,
        "per_class": sample.per_class, "figures": figs,
        "per_image": {m: {k: [None if not math.isfinite(float(x)) else round(float(x), 6)
                              for x in v] for k, v in s.items()}
                      for m, s in sample.scores.items()},
        "images": sample.names,
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


# ---------------------------------------------------------------------------------------
# Public entry point
def build_report(
    out_dir: str | os.PathLike[str],
    *,
    store: str | None = None,
    image_dir: str | os.PathLike[str] | None = None,
    model: str = "efficientnet-lite0",
    weights: str | None = None,
    layer: str | None = None,
    n: int | None = None,
    every: int = 1,
    image_size: int = 224,
    step: int = 224,
    methods: Sequence[str] = METHODS,
    batch_size: int = 2,
    chunk_size: int | None = None,
    groups: int = 32,
    target: str = "predicted",
    seed: int = 0,
    n_boot: int = 2000,
    gallery: int = 6,
    by: str = "class_explained",
    cache_dir: str | os.PathLike[str] | None = None,
    keep_cache: bool = False,
    time_budget_s: float | None = None,
    storage_options: dict[str, Any] | None = None,
    title: str | None = None,
    command: str | None = None,
    progress: bool = False,
    device: str | None = None,
) -> Path:
    """Write ``report.md`` (+ ``report.json`` and PNG figures) into ``out_dir``; return its path.

    Exactly one source: ``store`` (summarise a pipeline store) or ``image_dir`` (compute
    UnionCAM and the other ``methods`` on ``n`` images, every ``every``-th, at
    ``image_size`` px on ``layer``, RISE ``step`` pixels per step). The image-folder mode
    checkpoints each batch under ``cache_dir`` (default ``out_dir/.cache``; deleted after
    a complete report unless ``keep_cache``) and stops starting new batches after
    ``time_budget_s`` seconds; rerunning continues from the cache. ``device``: where the
    model runs (default: CUDA when available, else the CPU).
    """
    if (store is None) == (image_dir is None):
        raise ReportError(
            "give exactly one source: a store (--store) or an image folder (--images)"
        )
    for name, v in (("n", n), ("every", every), ("image_size", image_size), ("step", step),
                    ("batch_size", batch_size), ("n_boot", n_boot), ("groups", groups)):  # fmt: skip
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ReportError(f"{name} must be a positive integer, got {v!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ReportError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if gallery < 0:
        raise ReportError(f"gallery must be >= 0, got {gallery}")
    if target not in ("predicted", "label"):
        raise ReportError(f"target must be 'predicted' or 'label', got {target!r}")
    out = Path(out_dir)
    if store is not None:
        sample = _store_sample(str(store), storage_options=storage_options, gallery=gallery,
                               seed=seed, by=by)  # fmt: skip
        return _render(sample, out, n_boot=n_boot, seed=seed,
                       title=title or "UnionCAM faithfulness report (pipeline store)",
                       command=command)  # fmt: skip
    from pipeline.evaluate import _check_methods

    try:
        methods = _check_methods(methods)
    except ValueError as e:
        raise ReportError(str(e)) from None
    cache = Path(cache_dir) if cache_dir is not None else out / ".cache"
    sample = _images_sample(
        Path(image_dir), model=model, weights=weights, layer=layer, n=n, every=every,  # type: ignore[arg-type]
        image_size=image_size, step=step, methods=methods, batch_size=batch_size,
        chunk_size=chunk_size, groups=groups, target=target, seed=seed, cache_dir=cache,
        time_budget_s=time_budget_s, progress=progress, gallery=gallery, device=device,
    )  # fmt: skip
    path = _render(sample, out, n_boot=n_boot, seed=seed,
                   title=title or "UnionCAM faithfulness report", command=command)  # fmt: skip
    complete = not any("requested images were explained" in s for s in sample.notes)
    if complete and not keep_cache and cache_dir is None:
        shutil.rmtree(cache, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------
# Command line: ``unioncam report`` (wired into pipeline.cli) and ``python -m pipeline.report``
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """The ``report`` subcommand's options (shared by ``unioncam report`` and ``-m``)."""
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for report.md and its PNGs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="summarise a pipeline store (its stored metrics and maps)")
    src.add_argument("--images", metavar="DIR",
                     help="compute on the fly for the images of DIR (labels.csv order if present)")  # fmt: skip
    g = p.add_argument_group("--images mode")
    g.add_argument("--model", default="efficientnet-lite0")
    g.add_argument("--weights")
    g.add_argument("--layer", help="target layer (default: the model's)")
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("-n", "--limit", dest="n", type=int, help="at most N images")
    g.add_argument("--every", type=int, default=1, help="take every k-th image (default 1)")
    g.add_argument("--step", type=int, default=224,
                   help="RISE pixels per step (default 224 = 224 steps at 224 px)")  # fmt: skip
    g.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma separated (default {','.join(METHODS)})")  # fmt: skip
    g.add_argument("--groups", type=int, default=32, help="Group-CAM groups")
    g.add_argument("--batch-size", type=int, default=2, help="images per checkpointed batch")
    g.add_argument("--chunk-size", type=int, help="forwards per model call (speed only)")
    g.add_argument("--target", choices=("predicted", "label"), default="predicted")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no new batch after this long (the report covers what is done)")  # fmt: skip
    g.add_argument("--cache-dir", help="checkpoint folder (default OUT_DIR/.cache)")
    g.add_argument("--keep-cache", action="store_true")
    g = p.add_argument_group("report")
    g.add_argument("--gallery", type=int, default=6, help="gallery rows (0 = none)")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--by", choices=("class_explained", "label", "predicted"),
                   default="class_explained", help="--store mode: per-class grouping")  # fmt: skip
    g.add_argument("--title")
    g.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for a remote store (repeatable)")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="no progress lines")


def _command_text(a: argparse.Namespace) -> str:
    parts = ["unioncam report"]
    if a.store:
        parts.append(f"--store {a.store}")
    else:
        parts.append(f"--images {a.images}")
        defaults = {"model": "efficientnet-lite0", "image_size": 224, "every": 1, "step": 224,
                    "methods": ",".join(METHODS), "groups": 32, "batch_size": 2,
                    "target": "predicted"}  # fmt: skip
        for k in ("model", "weights", "layer", "image_size", "n", "every", "step", "methods",
                  "groups", "batch_size", "chunk_size", "target", "time_budget"):  # fmt: skip
            v = getattr(a, k)
            if v is not None and v != defaults.get(k):
                flag = "-n" if k == "n" else "--" + k.replace("_", "-")
                parts.append(f"{flag} {v}")
    for k in ("gallery", "bootstrap", "seed"):
        v = getattr(a, k)
        if v != {"gallery": 6, "bootstrap": 2000, "seed": 0}[k]:
            parts.append(f"--{k} {v}")
    parts.append(str(a.out_dir))
    return " ".join(parts)


def report_command(a: argparse.Namespace) -> int:
    """Run the parsed ``report`` command; errors propagate (the caller prints one line)."""
    from pipeline.cli import _storage_options  # one parser for --storage-option

    so = _storage_options(a.storage_option)
    methods = tuple(s.strip() for s in a.methods.split(",") if s.strip())
    path = build_report(
        a.out_dir, store=a.store, image_dir=a.images, model=a.model, weights=a.weights,
        layer=a.layer, n=a.n, every=a.every, image_size=a.image_size, step=a.step,
        methods=methods, batch_size=a.batch_size, chunk_size=a.chunk_size, groups=a.groups,
        target=a.target, seed=a.seed, n_boot=a.bootstrap, gallery=a.gallery, by=a.by,
        cache_dir=a.cache_dir, keep_cache=a.keep_cache, time_budget_s=a.time_budget,
        storage_options=so, title=a.title, command=_command_text(a), progress=not a.quiet,
        device=a.device,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.report ...``: same options as ``unioncam report``; a bad input
    is one line on stderr and exit code 2."""
    p = argparse.ArgumentParser(prog="unioncam report", description=__doc__.split("\n\n")[0])
    add_report_arguments(p)
    a = p.parse_args(argv)
    try:
        return report_command(a)
    except KeyboardInterrupt:
        print("unioncam report: interrupted (rerun to continue from the cache)", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("UNIONCAM_DEBUG"):
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, ValueError | OSError):
            text = f"{type(e).__name__}: {text}"
        print(f"unioncam report: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
