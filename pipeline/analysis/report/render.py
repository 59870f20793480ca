"""Rendering a report: ``report.md`` (tables, findings), ``report.json`` and the figures.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.evaluate import METHODS, check_methods
from pipeline.analysis.report.figures import (
    fig_curves,
    fig_distribution,
    fig_gallery,
    fig_sanity,
    fig_scores,
    fig_selection,
)
from pipeline.analysis.report.images import images_sample
from pipeline.analysis.report.sample import ReportSample
from pipeline.analysis.report.stats import (
    METRIC_TITLES,
    ReportError,
    method_stats,
)
from pipeline.analysis.report.stored import store_sample
from pipeline.store.names import INS_DEL_METRICS, ROAD_METRICS

__all__ = ['build_report', 'render']


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
    for k in (*INS_DEL_METRICS, "road"):
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


def markdown(sample: ReportSample, stats: dict[str, Any], figs: dict[str, str],
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
    road = [m for m in sample.methods if "road" in stats["methods"][m]]
    if road:
        L += ["", "## ROAD", "",
              "RemOve And Debias (Rong, Leemann et al. 2022): the removed pixels are filled by "
              "noisy linear imputation from their neighbours, so the shape of the removed "
              "region tells the model nothing. MoRF: class probability with the most relevant "
              "10–90 % removed (lower is better); LeRF: the least relevant removed (higher is "
              "better); ROAD = (LeRF − MoRF) / 2, pytorch-grad-cam's ROADCombined scale.", "",
              "| method | n | " + " | ".join(f"{METRIC_TITLES[k]} (95% CI)" for k in ROAD_METRICS)
              + f" | Δ ROAD vs {ref} [95% CI] | verdict |",
              "|---|---:|" + "---:|" * len(ROAD_METRICS) + "---:|---|"]  # fmt: skip
        for m in road:
            st = stats["methods"][m]
            d = stats["paired"].get(m, {}).get("road")
            L.append(f"| {sample.labels[m]} | {st['road']['n']} | "
                     + " | ".join(_fmt_ci(st[k]) if k in st else "–" for k in ROAD_METRICS)
                     + (f" | {_fmt_diff(d)} | {d['verdict']} |" if d else " | – | – |"))  # fmt: skip
    if "scores" in figs:
        L += ["", f"![mean scores with 95% CI]({figs['scores']})"]
    if sample.sanity:
        L += _sanity_section(sample, figs)
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


def _sanity_section(sample: ReportSample, figs: dict[str, str]) -> list[str]:
    first = next(iter(sample.sanity.values()))
    k = first["layer_step"]
    L = ["", "## Sanity check: model randomisation", "",
         f"Adebayo et al. (NeurIPS 2018): the model's blocks are re-initialised one by one "
         f"from the top (on a copy), and each method's maps of the same class on the same "
         f"{first['n']} image(s) are compared with the original ones. A method that explains "
         f"the model must change. **Passes**: mean Spearman correlation below "
         f"{first['threshold']} at the first step that changes the target layer's output "
         f"(`{first['steps'][k]}`, step {k}).", "",
         "| method | Spearman at the layer's step | SSIM at the layer's step | verdict |",
         "|---|---:|---:|---|"]  # fmt: skip
    for m, s in sample.sanity.items():
        L.append(f"| {sample.labels.get(m, m)} | {s['spearman_at_layer']:.3f} | "
                 f"{s['ssim_at_layer']:.3f} | {'passes' if s['passes'] else '**fails**'} |")
    if "sanity" in figs:
        L += ["", f"![sanity check curves]({figs['sanity']})"]
    return L


def render(sample: ReportSample, out: Path, *, n_boot: int, seed: int, title: str,
            command: str | None) -> Path:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    stats = method_stats(sample, n_boot, seed)
    if 1 < sample.n < 20 and sample.methods:
        sample.notes.insert(0, f"With n = {sample.n} images the percentile bootstrap intervals "
                            "are optimistic (too narrow); read the verdicts as indicative.")  # fmt: skip
    figs: dict[str, str] = {}
    if sample.methods:
        fig_scores(sample, stats, out / "scores.png")
        figs["scores"] = "scores.png"
        if any("ins_minus_del" in sample.scores[m] for m in sample.methods):
            fig_distribution(sample, out / "distribution.png")
            figs["distribution"] = "distribution.png"
    if sample.curves:
        fig_curves(sample, out / "curves.png")
        figs["curves"] = "curves.png"
    if sample.selection_counts:
        fig_selection(sample, out / "selection.png")
        figs["selection"] = "selection.png"
    if sample.sanity:
        fig_sanity(sample, out / "sanity.png")
        figs["sanity"] = "sanity.png"
    if sample.gallery:
        fig_gallery(sample, out / "gallery.png")
        figs["gallery"] = "gallery.png"
    md = markdown(sample, stats, figs, title, command)
    path = out / "report.md"
    path.write_text(md, encoding="utf-8")
    summary = {
        "source": sample.source, "n": sample.n, "reference": sample.reference,
        "labels": sample.labels, "provenance": sample.provenance, "stats": stats,
        "selection_counts": sample.selection_counts, "notes": sample.notes,
        "per_class": sample.per_class, "figures": figs, "sanity": sample.sanity,
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
    by: str = "target",
    cache_dir: str | os.PathLike[str] | None = None,
    keep_cache: bool = False,
    time_budget_s: float | None = None,
    storage_options: dict[str, Any] | None = None,
    title: str | None = None,
    command: str | None = None,
    progress: bool = False,
    device: str | None = None,
    sanity: int = 0,
) -> Path:
    """Write ``report.md`` (+ ``report.json`` and PNG figures) into ``out_dir``; return its path.

    Exactly one source: ``store`` (summarise a pipeline store) or ``image_dir`` (compute
    UnionCAM and the other ``methods`` on ``n`` images, every ``every``-th, at
    ``image_size`` px on ``layer``, RISE ``step`` pixels per step). The image-folder mode
    checkpoints each batch under ``cache_dir`` (default ``out_dir/.cache``; deleted after
    a complete report unless ``keep_cache``) and stops starting new batches after
    ``time_budget_s`` seconds; rerunning continues from the cache. ``device``: where the
    model runs, for the sanity check too (default: CUDA when available, else the CPU).
    ``sanity``: run the randomisation sanity check on that many images (0 = none; a store
    needs its photos and the run's model to be readable).
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
    if isinstance(sanity, bool) or not isinstance(sanity, int) or sanity < 0:
        raise ReportError(f"sanity must be an integer >= 0, got {sanity!r}")
    if target not in ("predicted", "label"):
        raise ReportError(f"target must be 'predicted' or 'label', got {target!r}")
    out = Path(out_dir)
    if store is not None:
        sample = store_sample(str(store), storage_options=storage_options, gallery=gallery,
                               seed=seed, by=by, sanity=sanity, progress=progress,
                               device=device)  # fmt: skip
        return render(sample, out, n_boot=n_boot, seed=seed,
                       title=title or "UnionCAM faithfulness report (pipeline store)",
                       command=command)  # fmt: skip
    try:
        methods = check_methods(methods)
    except ValueError as e:
        raise ReportError(str(e)) from None
    cache = Path(cache_dir) if cache_dir is not None else out / ".cache"
    sample = images_sample(
        Path(image_dir), model=model, weights=weights, layer=layer, n=n, every=every,  # type: ignore[arg-type]
        image_size=image_size, step=step, methods=methods, batch_size=batch_size,
        chunk_size=chunk_size, groups=groups, target=target, seed=seed, cache_dir=cache,
        time_budget_s=time_budget_s, progress=progress, gallery=gallery, device=device,
        sanity=sanity,
    )  # fmt: skip
    path = render(sample, out, n_boot=n_boot, seed=seed,
                   title=title or "UnionCAM faithfulness report", command=command)  # fmt: skip
    complete = not any("requested images were explained" in s for s in sample.notes)
    if complete and not keep_cache and cache_dir is None:
        shutil.rmtree(cache, ignore_errors=True)
    return path

