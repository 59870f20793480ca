"""Rendering a report: ``report.md`` (tables, findings), ``report.json`` and the figures.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.report.config import ReportConfig
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
from pipeline.analysis.report.stats import METRIC_TITLES, method_stats
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
def build_report(out_dir: str | os.PathLike[str], config: ReportConfig) -> Path:
    """Write ``report.md`` (+ ``report.json`` and PNG figures) into ``out_dir``; return its path.

    ``config.store``: summarise a pipeline store. ``config.images``: compute UnionCAM and the
    other ``methods`` on the folder's images; each batch is checkpointed under
    ``cache_dir`` (default ``out_dir/.cache``, deleted after a complete report unless
    ``keep_cache``) and no new batch starts after ``time_budget_s``, so rerunning continues
    from the cache. See :class:`ReportConfig` for every setting.
    """
    c = config
    out = Path(out_dir)
    if c.store is not None:
        sample = store_sample(str(c.store), storage_options=c.storage_options, gallery=c.gallery,
                              seed=c.seed, by=c.by, sanity=c.sanity, progress=c.progress,
                              device=c.device)  # fmt: skip
        return render(sample, out, n_boot=c.n_boot, seed=c.seed,
                      title=c.title or "UnionCAM faithfulness report (pipeline store)",
                      command=c.command)  # fmt: skip
    cache = Path(c.cache_dir) if c.cache_dir is not None else out / ".cache"
    sample = images_sample(Path(c.images), c, cache_dir=cache)  # type: ignore[arg-type]
    path = render(sample, out, n_boot=c.n_boot, seed=c.seed,
                  title=c.title or "UnionCAM faithfulness report", command=c.command)  # fmt: skip
    complete = not any("requested images were explained" in s for s in sample.notes)
    if complete and not c.keep_cache and c.cache_dir is None:
        shutil.rmtree(cache, ignore_errors=True)
    return path
