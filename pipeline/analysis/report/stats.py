"""Report statistics: bootstrap intervals, paired differences, per-class means.

Why bootstrap: per-image AUCs are far from normal (many near 0 or 1), and the methods are
compared on the same images, so a percentile bootstrap over images (paired for the
differences) is the simplest honest interval. Above 50,000 images a normal approximation
is used instead (the bootstrap would cost minutes and agrees there); the report says which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.analysis.report.sample import ReportSample
from pipeline.store.names import INS_DEL_METRICS, ROAD_METRICS

__all__ = ['EXACT_BOOTSTRAP_MAX', 'METRIC_SIGN', 'METRIC_TITLES', 'ReportError', 'bootstrap_ci', 'by_class', 'finite', 'method_stats', 'paired_bootstrap']


#: Above this many images the CIs use the normal approximation (see module docstring).
EXACT_BOOTSTRAP_MAX = 50_000
METRIC_TITLES = {
    "insertion": "insertion ↑",
    "deletion": "deletion ↓",
    "ins_minus_del": "ins − del ↑",
    "road_morf": "ROAD MoRF ↓",
    "road_lerf": "ROAD LeRF ↑",
    "road": "ROAD ↑",
}
#: +1: higher is better, -1: lower is better.
METRIC_SIGN = {"insertion": 1, "deletion": -1, "ins_minus_del": 1, "road_morf": -1,
               "road_lerf": 1, "road": 1}
CACHE_VERSION = 1


class ReportError(ValueError):
    """A bad report input (folder, store, setting); the message is one line."""


def finite(values: Any) -> np.ndarray:
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
    v = finite(values)
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


def by_class(
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


def method_stats(sample: ReportSample, n_boot: int, seed: int) -> dict[str, Any]:
    """Per method and metric: mean with CI; paired difference to the reference."""
    out: dict[str, Any] = {"methods": {}, "paired": {}, "n_boot": n_boot,
                           "ci": "normal approximation" if sample.n > EXACT_BOOTSTRAP_MAX
                           else f"percentile bootstrap over images, {n_boot} resamples"}  # fmt: skip
    ref = sample.scores.get(sample.reference, {})
    for m in sample.methods:
        out["methods"][m] = {}
        for k in INS_DEL_METRICS + ROAD_METRICS:
            if k in sample.scores[m]:
                mean, lo, hi = bootstrap_ci(sample.scores[m][k], n_boot=n_boot, seed=seed)
                out["methods"][m][k] = {"mean": mean, "low": lo, "high": hi,
                                        "n": int(finite(sample.scores[m][k]).size)}  # fmt: skip
        if m == sample.reference:
            continue
        out["paired"][m] = {}
        for k in INS_DEL_METRICS + ROAD_METRICS:
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

