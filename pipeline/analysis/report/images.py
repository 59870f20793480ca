"""Report source 1: an image folder, every method computed on the fly.

Results are checkpointed per batch (``.npz`` in a cache folder), so an interrupted or
time-budgeted run resumes where it stopped; images are processed in a seeded random
order, so a run cut short by ``--time-budget`` reports a random subset, not the
alphabetically first classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.analysis.report.sample import GalleryItem, ReportSample, class_names, cname
from pipeline.analysis.report.stats import ReportError

if TYPE_CHECKING:
    from pipeline.analysis.report.config import ReportConfig

__all__ = ['IMAGE_EXTS', 'images_sample']


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CACHE_VERSION = 2  # 2: method names of unioncam.names; the reference's pool stored


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
    from pipeline.data.decode import DecodeError, decode_image, read_bytes

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


def images_sample(image_dir: Path, config: ReportConfig, *, cache_dir: Path) -> ReportSample:
    """Explain and score the folder's images as ``config`` says (resuming from ``cache_dir``)."""
    c = config
    model, weights, layer, n, every = c.model, c.weights, c.layer, c.n, c.every
    image_size, step, methods, batch_size = c.image_size, c.step, c.methods, c.batch_size
    chunk_size, groups, target, seed = c.chunk_size, c.groups, c.target, c.seed
    time_budget_s, progress, gallery, device, sanity = (c.time_budget_s, c.progress, c.gallery,
                                                        c.device, c.sanity)  # fmt: skip
    import torch

    from pipeline.analysis.evaluate import compare_methods
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
                pool=np.asarray(c.pool, dtype=str),
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
    sample = _assemble_images(items, cache, len(batches), settings, loaded, pre, image_dir,
                              stopped_early, gallery, device_text)  # fmt: skip
    if sanity > 0:
        sample.sanity = _sanity_images(items, cache, sanity, net, pre, layer_name, methods,
                                       groups, chunk_size, target, dev, progress)  # fmt: skip
    return sample


def _sanity_images(items, cache: Path, count: int, net, pre, layer: str, methods, groups: int,
                   chunk_size: int | None, target: str, dev, progress: bool) -> dict[str, Any]:
    """The randomisation check on the first ``count`` readable images (cached by count)."""
    import torch

    from pipeline.analysis.report.sanity import report_specs, run_sanity

    path = cache / f"sanity-{count}.json"
    if path.exists():
        return json.loads(path.read_text())
    xs, labels = [], []
    for it in items:
        if len(xs) == count:
            break
        try:
            xs.append(pre(_load_image(it.path))[0])
        except ReportError:
            continue
        labels.append(it.label)
    if not xs:
        return {}
    specs = report_specs(methods, groups=groups, chunk_size=chunk_size)
    out = run_sanity(net, torch.stack(xs).to(dev), layer, specs,
                     targets=labels if target == "label" else None,
                     progress=(lambda m: _log(True, m)) if progress else None)  # fmt: skip
    path.write_text(json.dumps(out))
    return out


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
    from unioncam.names import member_label, method_config, method_label

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
    # The reference: the first UnionCAM asked for (the default list's unioncam:paper).
    reference = next((m for m in methods if method_config(m) is not None), methods[0])
    pool = tuple(str(p) for p in parts[0]["pool"].tolist())
    counts = {}
    if pool:
        counts = {p: int((selected == j).sum()) for j, p in enumerate(pool)}
    names = class_names()
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
        if pool and 0 <= selected[r] < len(pool):
            chosen = member_label(pool[int(selected[r])])
            sel = f"; UnionCAM chose {'L_fused' if chosen == 'Fused (L_fused)' else chosen}"
        g_items.append(GalleryItem(
            title=f"{Path(it.name).stem[:30]}; explained: {cname(names, c)[:40]}{sel}",
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
        labels={m: method_label(m) for m in order},
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

