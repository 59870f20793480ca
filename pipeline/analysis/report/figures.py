"""Report figures (matplotlib, Agg): scores with CIs, curves, selection counts, gallery.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.images import colorize
from pipeline.analysis.report.sample import ReportSample
from pipeline.analysis.report.stats import METRIC_TITLES, finite
from pipeline.store.names import INS_DEL_METRICS, ROAD_METRICS

__all__ = ['fig_curves', 'fig_distribution', 'fig_gallery', 'fig_scores', 'fig_selection']


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_COLORS = {
    "unioncam:paper": "#d62728", "unioncam": "#e377c2", "gradcam": "#1f77b4", "gradcam++": "#17becf",
    "scorecam": "#2ca02c", "groupcam": "#9467bd", "denoised": "#ff7f0e",
    "fused:denoised+scorecam": "#8c564b",
}  # fmt: skip


def _color(m: str, i: int) -> str:
    return _COLORS.get(m) or f"C{i % 10}"


def fig_scores(sample: ReportSample, stats: dict[str, Any], path: Path) -> None:
    plt = _plt()
    metrics = [k for k in INS_DEL_METRICS + ROAD_METRICS
               if any(k in stats["methods"][m] for m in sample.methods)]
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


def fig_curves(sample: ReportSample, path: Path) -> None:
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


def fig_selection(sample: ReportSample, path: Path) -> None:
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


def fig_distribution(sample: ReportSample, path: Path) -> None:
    plt = _plt()
    ms = [m for m in sample.methods if "ins_minus_del" in sample.scores[m]]
    data = [finite(sample.scores[m]["ins_minus_del"]) for m in ms]
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


def fig_gallery(sample: ReportSample, path: Path) -> None:
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


def fig_sanity(sample: ReportSample, path: Path) -> None:
    """Mean Spearman and SSIM with the original maps as blocks are re-initialised."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    longest: list[str] = []
    layer_step = None
    for i, (m, s) in enumerate(sample.sanity.items()):
        x = np.arange(len(s["steps"]))
        for ax, key in zip(axes, ("spearman", "ssim"), strict=True):
            ax.plot(x, s[key], marker="o", ms=3, color=_color(m, i),
                    label=sample.labels.get(m, m))  # fmt: skip
        if len(s["steps"]) > len(longest):
            longest = s["steps"]
        layer_step = s["layer_step"]
    for ax, t in zip(axes, ("Spearman rank correlation", "SSIM"), strict=True):
        ax.set_title(f"{t} with the original maps", fontsize=10)
        ax.set_xticks(np.arange(len(longest)))
        ax.set_xticklabels(longest, rotation=35, ha="right", fontsize=7)
        if layer_step is not None:
            ax.axvline(layer_step, color="k", ls=":", lw=1)
        ax.grid(alpha=0.3)
        ax.set_xlabel("re-initialised down to (top first)", fontsize=8)
    axes[0].axhline(sample.sanity[next(iter(sample.sanity))]["threshold"], color="grey", ls="--",
                    lw=0.8)  # fmt: skip
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
