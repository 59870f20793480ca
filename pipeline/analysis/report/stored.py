"""Report source 2: a pipeline store, summarised from its stored metrics and maps.

Read unit by unit through the one store reader: only the per-image scalars and the
gallery's few maps are loaded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.analysis.reader import open_reader
from pipeline.analysis.report.sample import GalleryItem, ReportSample, class_names, cname
from pipeline.analysis.report.stats import ReportError, by_class
from pipeline.data.decode import Status
from pipeline.store.layout import safe_name
from pipeline.store.names import INS_DEL_METRICS, ROAD_METRICS, parse_metric_name

__all__ = ['member_label', 'read_store_scalars', 'store_sample', 'summarize_store']


def member_label(member: str) -> str:
    """A pool member's row title in a store report: the library's title, marked "(pool)"
    (a fused member by its pool name, as the store spells it)."""
    from unioncam.names import member_label as title

    kind, _, what = member.partition(":")
    if kind == "fused":
        return f"Fused {what} (pool)"
    if kind in ("region", "gradient"):
        return f"{title(member)} (pool)"
    return member


def summarize_store(
    store: str,
    *,
    by: str = "target",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Overall and per-class means of every stored metric and the selection counts.

    Reads the per-image scalars unit by unit (finished units only, OK rows only); no maps.
    Returns ``{"n", "metrics": {name: mean}, "selection": {member: count},
    "per_class": [{"class", "n", "metrics": {...}, "selection": {...}}]}`` — the summary
    ``unioncam query`` can print.
    """
    data = read_store_scalars(store, by=by, storage_options=storage_options)
    pool = data["pool"]
    ok = data["ok"]
    out: dict[str, Any] = {"n": int(ok.sum()), "metrics": {}, "selection": {}, "per_class": []}
    for name, v in data["metrics"].items():
        out["metrics"][name] = float(np.nanmean(v[ok])) if ok.any() else math.nan
    sel = data["selected"][ok]
    out["selection"] = {p: int((sel == j).sum()) for j, p in enumerate(pool)}
    metrics_ok = {k: v[ok] for k, v in data["metrics"].items()}
    out["per_class"] = by_class(data["by"][ok], metrics_ok, sel, pool)
    return out


def read_store_scalars(
    store: str, *, by: str = "target", storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The per-image scalars a report needs, from every finished unit (through the reader)."""
    if by not in ("target", "label", "predicted"):
        raise ReportError(f"by must be target, label or predicted, got {by!r}")
    try:
        reader = open_reader(store, storage_options)
    except ValueError as e:
        raise ReportError(str(e)) from None
    paths = reader.metric_paths()
    union = ["selected"] if reader.layout.has_pool else []
    rows, cols = reader.read_columns(["status", *union, "prob", by, *paths.values()])
    return {
        "reader": reader,
        "layout": reader.layout,
        "group": reader.group,
        "pool": tuple(reader.pool),
        "rows": rows,
        "ok": cols["status"] == int(Status.OK),
        "status": cols["status"],
        "selected": (cols["selected"].astype(np.int64) if union
                     else np.full(rows.shape, -1, dtype=np.int64)),
        "prob": cols["prob"],
        "by": cols[by].astype(np.int64),
        "metrics": {n: cols[p].astype(np.float64) for n, p in paths.items()},
        "units_done": len(reader.done_units()),
    }


def store_sample(
    store: str,
    *,
    storage_options: dict[str, Any] | None,
    gallery: int,
    seed: int,
    by: str,
    sanity: int = 0,
    progress: bool = False,
    device: str | None = None,
) -> ReportSample:
    d = read_store_scalars(store, by=by, storage_options=storage_options)
    layout, group, pool, ok = d["layout"], d["group"], d["pool"], d["ok"]
    if not ok.any():
        raise ReportError(
            f"store {store}: no explained images yet ({d['units_done']} of "
            f"{layout.num_units} units done)"
        )
    attrs = dict(group.attrs)
    rows = d["rows"][ok]
    metrics = {k: v[ok] for k, v in d["metrics"].items()}

    # method -> metric -> values: bare names are the primary method's (UnionCAM's selected
    # map), "<metric>@<method>" the run's other methods, "<metric>@<member>" pool members.
    reader = d["reader"]
    table: dict[str, dict[str, np.ndarray]] = {}
    for name, v in metrics.items():
        metric, member = parse_metric_name(name)
        if metric not in INS_DEL_METRICS + ROAD_METRICS:
            continue
        table.setdefault(member or reader.primary, {})[metric] = v
    for vals in table.values():
        if "ins_minus_del" not in vals and {"insertion", "deletion"} <= set(vals):
            vals["ins_minus_del"] = vals["insertion"] - vals["deletion"]
    run_methods = sorted(reader.methods, key=lambda m: m != reader.primary)
    methods = [m for m in run_methods if m in table] + [p for p in pool if p in table]
    labels = {m: ("UnionCAM (selected)" if m == "unioncam" else member_label(m)) for m in methods}
    notes = []
    if not methods:
        notes.append("This store has no insertion/deletion metrics: run with "
                     "`--metrics insertion,deletion,ins_minus_del` (and "
                     "`--metrics-all-members` to score every pool member).")  # fmt: skip
    elif len(methods) == 1:
        notes.append("Only the selected map was scored; `--metrics-all-members` also scores "
                     "every pool member, which gives the paired comparison.")  # fmt: skip
    if len(reader.methods) == 1:
        notes.append("This store holds one method; `unioncam run --method gradcam,unioncam` "
                     "stores several for the same images (each scored with --metrics), and "
                     "`unioncam report --images DIR` computes them on the fly.")  # fmt: skip
    notes.append("Curves are not stored, only their areas.")
    other = {k: v for k, v in metrics.items()
             if parse_metric_name(k)[0] not in INS_DEL_METRICS + ROAD_METRICS}
    for k, v in other.items():
        notes.append(
            f"stored metric `{k}`: mean {np.nanmean(v):.4f} over {np.isfinite(v).sum()} images"
        )
    sel = d["selected"][ok]
    counts = {p: int((sel == j).sum()) for j, p in enumerate(pool)}
    classes = d["by"][ok]
    cnames = class_names()

    per_class = []
    if methods:
        ref = table[methods[0]]
        for r in by_class(classes, {k: ref[k] for k in INS_DEL_METRICS if k in ref}, sel, pool):
            per_class.append({
                "class": r["class"], "name": cname(cnames, r["class"]), "n": r["n"],
                **r["metrics"], "selected": r["selection"],
            })  # fmt: skip
        per_class.sort(key=lambda r: (-r["n"], r["class"]))

    # Gallery: seeded choice of OK rows; stored maps (and components if stored) on the crop.
    g_items = []
    if gallery > 0:
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(rows.size, size=min(gallery, rows.size), replace=False))
        comps = [c for c in layout.components if f"components/{safe_name(c)}" in group]
        missing_photo = 0
        for j in pick.tolist():
            r = int(rows[j])
            box = tuple(int(v) for v in np.asarray(group["crop_box"][r]))
            h, w = layout.image_size
            arr = None
            if reader is not None:
                try:
                    img = reader.original_image(r)
                    arr = np.asarray(img.crop(box).resize((w, h)).convert("RGB"))
                except Exception:
                    missing_photo += 1
            maps = {m: np.asarray(group[layout.maps_path(m)][r], dtype=np.float32)
                    for m in run_methods}
            for c in comps:
                maps[c] = np.asarray(group[f"components/{safe_name(c)}"][r], dtype=np.float32)
            s = int(sel[j])
            c = int(classes[j])
            g_items.append(GalleryItem(
                title=f"row {r}: {cname(cnames, c)[:40]}"
                      + (f"; selected: {pool[s]}" if 0 <= s < len(pool) else ""),
                image=arr,
                maps=maps,
                scores={m: float(table[m]["ins_minus_del"][j]) for m in methods
                        if m in maps and "ins_minus_del" in table[m]},
            ))  # fmt: skip
        if missing_photo:
            notes.append(f"{missing_photo} gallery photos could not be read (manifest "
                         f"{attrs.get('manifest')!r}); their maps are shown alone.")  # fmt: skip
        for m in [k for it in g_items for k in it.maps]:
            labels.setdefault(m, member_label(m) if m != "unioncam" else "UnionCAM")
    # pool members and UnionCAM have their labels; the run's other methods the registry's
    from unioncam.names import method_label

    labels = {m: method_label(m) if m in reader.methods and m != "unioncam" else v
              for m, v in labels.items()}

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
    sanity_out: dict[str, Any] = {}
    if sanity > 0:
        sanity_out = _sanity_store(reader, rows, sanity, progress, device)
        if not sanity_out:
            notes.append(f"The sanity check found none of the first {sanity} rows' photos "
                         f"(manifest {attrs.get('manifest')!r}).")  # fmt: skip
    return ReportSample(
        sanity=sanity_out,
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


def _sanity_store(reader: Any, rows: np.ndarray, count: int, progress: bool,
                  device: str | None = None) -> dict[str, Any]:
    """The randomisation check for the run's methods, with the run's model, weights, layer,
    preprocessing and settings, on the first ``count`` explained rows whose photo can be
    read; each explains the class the run explained. ``device``: default CUDA when
    available, else the CPU, as in image-folder mode."""
    import sys

    import torch

    from pipeline.analysis.report.sanity import run_sanity, store_specs
    from pipeline.config import RunConfig, quiet_load_model

    attrs = dict(reader.group.attrs)
    cfg = RunConfig.from_dict(dict(attrs["config"]))
    loaded = quiet_load_model(cfg.model, cfg.weights)
    pre = loaded.preprocess
    size = int(reader.layout.image_size[0])
    if size != pre.crop_size:
        pre = pre.with_size(size)
    xs, targets = [], []
    for r in rows.tolist():
        if len(xs) == count:
            break
        try:
            xs.append(reader.model_input(int(r), pre))
        except (ValueError, OSError):  # a photo moved or broke since the run: try the next
            continue
        targets.append(int(reader.group["target"][int(r)]))
    if not xs:
        return {}
    log = (lambda m: print(f"[report] {m}", file=sys.stderr, flush=True)) if progress else None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return run_sanity(loaded.model.eval().to(dev), torch.stack(xs).to(dev), str(attrs["layer"]),
                      store_specs(reader.methods, cfg), targets=targets, progress=log)
