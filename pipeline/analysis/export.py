"""Exporting a store's per-row results: a CSV streamed unit by unit."""

from __future__ import annotations

import csv
import math
from typing import Any

import numpy as np

from pipeline.analysis.reader import StoreReader
from pipeline.data.classes import class_name
from pipeline.store.names import status_name, text

__all__ = ["export_csv"]


def export_csv(reader: StoreReader, path: str, names: list[str]) -> int:
    """Per-row results of every finished unit, streamed unit by unit into a CSV.

    Columns: ``row_id``, ``uri``, ``status``, ``error``, ``label``, ``predicted``,
    ``target``, ``class_name``, ``prob``; with UnionCAM in the store also
    ``baseline_prob``, ``selected`` (the member's name), ``beta:<member>`` and
    ``selection_score:<member>``; then every stored metric by its name
    (``insertion``, ``insertion@gradcam``, ...).
    """
    union = reader.layout.has_pool
    metrics = reader.metric_paths()
    cols = ["row_id", "uri", "status", "error", "label", "predicted", "target", "class_name",
            "prob"]  # fmt: skip
    arrays = ["uri", "status", "error", "label", "predicted", "target", "prob"]
    if union:
        cols += ["baseline_prob", "selected"] + [f"beta:{p}" for p in reader.pool]
        cols += [f"selection_score:{p}" for p in reader.pool]
        arrays += ["baseline_prob", "selected", "beta", "selection_score"]
    cols += list(metrics)
    arrays += list(metrics.values())
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for start, a in reader.iter_units(arrays):
            for i in range(a["status"].shape[0]):
                st = int(a["status"][i])
                ce = int(a["target"][i])
                row = [
                    start + i,
                    text(a["uri"][i]),
                    status_name(st),
                    text(a["error"][i]),
                    int(a["label"][i]),
                    int(a["predicted"][i]),
                    ce,
                    class_name(names, ce) if ce >= 0 else "",
                    _fmt(a["prob"][i]),
                ]
                if union:
                    sel = int(a["selected"][i])
                    row += [_fmt(a["baseline_prob"][i]),
                            reader.pool[sel] if 0 <= sel < len(reader.pool) else ""]
                    row += [_fmt(v) for v in np.asarray(a["beta"][i]).tolist()]
                    row += [_fmt(v) for v in np.asarray(a["selection_score"][i]).tolist()]
                row += [_fmt(a[path][i]) for path in metrics.values()]
                w.writerow(row)
                n += 1
    return n


def _fmt(v: Any) -> str:
    v = float(v)
    return "" if math.isnan(v) else f"{v:.6g}"
