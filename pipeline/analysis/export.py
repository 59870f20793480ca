"""Exporting a store's per-row results: a CSV streamed unit by unit."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.analysis.overlays import write_overlays
from pipeline.analysis.reader import StoreReader, open_reader
from pipeline.data.classes import class_name, load_class_names
from pipeline.messages import int_list
from pipeline.store.names import status_name, text

__all__ = ["add_export_command", "export_command", "export_csv"]


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
            # Column by column, then zipped into rows: per-cell calls cost ~40 s for
            # ImageNet train's 1.28 M rows.
            m = a["status"].shape[0]
            target = a["target"].tolist()
            columns = [range(start, start + m), [text(v) for v in a["uri"]],
                       [status_name(v) for v in a["status"].tolist()],
                       [text(v) for v in a["error"]], a["label"].tolist(),
                       a["predicted"].tolist(), target,
                       [class_name(names, c) if c >= 0 else "" for c in target],
                       _fmt_col(a["prob"])]  # fmt: skip
            if union:
                columns += [_fmt_col(a["baseline_prob"]),
                            [reader.pool[s] if 0 <= s < len(reader.pool) else ""
                             for s in a["selected"].tolist()]]  # fmt: skip
                columns += [_fmt_col(a["beta"][:, j]) for j in range(len(reader.pool))]
                columns += [_fmt_col(a["selection_score"][:, j]) for j in range(len(reader.pool))]
            columns += [_fmt_col(a[path]) for path in metrics.values()]
            w.writerows(zip(*columns, strict=True))
            n += m
    return n


def _fmt_col(values: Any) -> list[str]:
    """A float column as CSV cells: 6 significant digits, NaN as empty."""
    return [f"{v:.6g}" if v == v else "" for v in np.asarray(values, dtype=np.float64).tolist()]


def add_export_command(sub: Any, add_storage: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``export`` subcommand on the CLI's subparsers ``sub``."""
    from pipeline.analysis.fiftyone import add_fiftyone_arguments

    p = sub.add_parser(
        "export",
        help="export scores as CSV, overlays as PNGs and/or a FiftyOne dataset",
        description="Write a CSV of per-row results (status, classes, probabilities, β of "
        "every pool member, selected member), overlay PNGs and/or a FiftyOne dataset "
        "(needs the fiftyone extra).",
    )
    p.set_defaults(handler=export_command)
    p.add_argument("store", metavar="STORE")
    p.add_argument("--csv", metavar="FILE", help="write per-row results to this CSV")
    p.add_argument("--overlays", metavar="DIR", help="write overlay PNGs here")
    p.add_argument(
        "--rows", help="rows for --overlays (default: the --limit OK rows of highest probability)"
    )
    p.add_argument(
        "--limit",
        type=int,
        help="--overlays without --rows: the N OK rows with the highest probability (default "
        "100); --fiftyone: at most N rows (default: all)",
    )
    add_fiftyone_arguments(p)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--cmap", default="jet")
    p.add_argument("--method", help="whose maps, in a store of several methods "
                   "(default: unioncam if stored, else the run's first method); "
                   "--fiftyone takes several: a,b")
    add_storage(p)


def export_command(a: argparse.Namespace, storage_options: dict[str, Any] | None) -> int:
    """Run ``unioncam export``: the CSV, overlays and/or FiftyOne dataset asked for."""
    from pipeline.analysis.fiftyone import fiftyone_command

    if not a.csv and not a.overlays and not a.fiftyone:
        raise ValueError("export needs --csv FILE, --overlays DIR and/or --fiftyone NAME")
    r = open_reader(a.store, storage_options)
    names = load_class_names()
    if a.csv:
        n = export_csv(r, a.csv, names)
        print(f"wrote {a.csv} ({n} rows)")
    if a.overlays:
        if a.rows:
            rows = int_list(a.rows, "--rows")
        else:
            top = r.top_k("prob", 100 if a.limit is None else a.limit)
            rows = [x.row_id for x in sorted(top, key=lambda x: x.row_id)]
        paths = write_overlays(r, rows, a.overlays, alpha=a.alpha, cmap=a.cmap, class_names=names,
                                 method=a.method)
        print(f"wrote {len(paths)} overlay PNGs to {a.overlays}")
    if a.fiftyone:
        fiftyone_command(a, r, names, int_list(a.classes, "--classes") if a.classes else None)
    return 0
