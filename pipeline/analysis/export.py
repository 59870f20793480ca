"""Exporting a store's per-row results: a CSV streamed unit by unit."""

from __future__ import annotations

import csv
import math
from typing import Any

import numpy as np

from pipeline.analysis.reader import StoreReader
from pipeline.data.classes import class_name
from pipeline.data.decode import Status

__all__ = ["export_csv"]


def export_csv(reader: StoreReader, path: str, names: list[str]) -> int:
    """Per-row results of every finished unit, streamed unit by unit into a CSV."""
    cols = [
        "row_id",
        "uri",
        "status",
        "error",
        "label",
        "predicted",
        "target",
        "class_name",
        "prob",
        "baseline_prob",
        "selected",
    ] + [f"beta:{p}" for p in reader.pool]
    with_sel = "selection_score" in reader.group  # a run that selected by another rule than β
    if with_sel:
        cols += [f"selection_score:{p}" for p in reader.pool]
    n = 0
    arrays = [
        "uri",
        "status",
        "error",
        "label",
        "predicted",
        "target",
        "prob",
        "baseline_prob",
        "selected",
        "beta",
    ] + (["selection_score"] if with_sel else [])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for start, a in reader.iter_units(arrays):
            for i in range(a["status"].shape[0]):
                st = int(a["status"][i])
                sel = int(a["selected"][i])
                err = _text(a["error"][i])
                ce = int(a["target"][i])
                w.writerow(
                    [
                        start + i,
                        _text(a["uri"][i]),
                        Status(st).name if st in Status._value2member_map_ else st,
                        err,
                        int(a["label"][i]),
                        int(a["predicted"][i]),
                        ce,
                        class_name(names, ce) if ce >= 0 else "",
                        _fmt(a["prob"][i]),
                        _fmt(a["baseline_prob"][i]),
                        reader.pool[sel] if 0 <= sel < len(reader.pool) else "",
                    ]
                    + [_fmt(v) for v in np.asarray(a["beta"][i]).tolist()]
                    + ([_fmt(v) for v in np.asarray(a["selection_score"][i]).tolist()]
                       if with_sel else [])
                )
                n += 1
    return n


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v or "")


def _fmt(v: Any) -> str:
    v = float(v)
    return "" if math.isnan(v) else f"{v:.6g}"
