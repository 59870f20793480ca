"""``unioncam query``: per-class statistics, top-k rows, one row, maps and overlays, mean
maps, and the analysis's class table and strategies, printed or as JSON.

Why here and not in :mod:`pipeline.cli`: the CLI stays a thin table of commands; what a
query prints lives next to the reader it asks (like ``analyze`` and ``report``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.analysis.commands import add_strategies_query, query_analysis
from pipeline.analysis.overlays import write_overlays
from pipeline.analysis.reader import open_reader
from pipeline.data.classes import class_name, load_class_names
from pipeline.messages import int_list, ranges_text

__all__ = ["add_query_command", "query_command"]


def add_query_command(sub: Any, parser_class: type[argparse.ArgumentParser],
                      add_storage: Callable[[argparse.ArgumentParser], None]) -> None:  # fmt: skip
    """The ``query`` subcommand and its queries, on the CLI's subparsers ``sub``."""
    p = sub.add_parser(
        "query",
        help="per-class stats, top-k, maps, overlays, mean maps",
        description="Query a store without loading it whole. Examples: "
        "'unioncam query S classes', 'unioncam query S top --by beta -k 10', "
        "'unioncam query S maps --rows 0,5 --overlay --out DIR', 'unioncam query S mean --classes 281'.",
    )
    p.set_defaults(handler=query_command)
    p.add_argument("store", metavar="STORE")
    add_storage(p)
    qs = p.add_subparsers(dest="what", metavar="QUERY", parser_class=parser_class)
    q = qs.add_parser("classes", help="per-class β statistics and pool-member wins, or the "
                      "analysis's class table sorted by a descriptor")
    q.add_argument(
        "--by", default="target",
        help="target, label or predicted: β statistics of the classes in that column; a "
        "descriptor (centre_bias, border, spread, entropy, area, centre_x, centre_y), "
        "clever_hans, spearman or top_iou: the class table of 'unioncam analyze', largest first",
    )
    q.add_argument("--ascending", action="store_true", help="with a descriptor: smallest first")
    q.add_argument("--limit", type=int, default=50, help="show the N largest classes (0 = all)")
    q.add_argument("--json", action="store_true")
    add_strategies_query(qs)
    q = qs.add_parser("top", help="top-k (or bottom-k) rows by a score")
    q.add_argument(
        "--by", default=None,
        help="default beta (prob in a store without UnionCAM); beta, prob, baseline_prob, beta:<pool member>, metrics/<name>, "
        "selection_score, selection_score:<pool member> (what the selection rule ranked by)",
    )
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--bottom", action="store_true", help="smallest first")
    q.add_argument(
        "--class", dest="class_index", type=int, help="only rows explained for this class"
    )
    q.add_argument("--json", action="store_true")
    q = qs.add_parser("row", help="every stored field of one row (its file, status, scores)")
    q.add_argument("row_id", metavar="ROW", type=int)
    q.add_argument("--json", action="store_true")
    q = qs.add_parser("maps", help="maps of rows as .npy and/or overlay PNGs")
    q.add_argument("--rows", required=True, help="row ids, e.g. 0,5,10-12")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument(
        "--overlay", action="store_true", help="write overlay PNGs on the original images"
    )
    q.add_argument(
        "--npy", action="store_true", help="write the maps as maps.npy (rows in the given order)"
    )
    q.add_argument("--alpha", type=float, default=0.5)
    q.add_argument("--cmap", default="jet")
    q.add_argument(
        "--manifest", help="manifest to find the originals (default: the one recorded in the store)"
    )
    q.add_argument("--method", help="whose maps, in a store of several methods "
                   "(default: unioncam if stored, else the run's first method)")
    q = qs.add_parser("mean", help="mean map per class (PNG + .npy)")
    q.add_argument("--classes", help="class ids, e.g. 1,281-285 (default: all)")
    q.add_argument(
        "--by", choices=("target", "label", "predicted"), default="target"
    )
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--cmap", default="jet")
    q.add_argument("--method", help="whose maps, in a store of several methods "
                   "(default: unioncam if stored, else the run's first method)")


def query_command(a: argparse.Namespace, storage_options: dict[str, Any] | None) -> int:
    """Run ``unioncam query STORE WHAT ...``; returns the exit code."""
    if not a.what:
        raise ValueError(
            "query needs one of: classes, top, row, maps, mean, strategies "
            "(see unioncam query --help)"
        )
    r = open_reader(a.store, storage_options)
    names = load_class_names()
    if a.what == "strategies" or (a.what == "classes" and a.by not in ("target", "label",
                                                                        "predicted")):
        return query_analysis(a, r, names)
    if a.what == "classes":
        stats = sorted(r.class_stats(by=a.by), key=lambda s: (-s.count, s.class_index))
        stored = {k for s in stats for k in s.mean_metrics}
        shown = [k for k in ("insertion", "deletion", "ins_minus_del") if k in stored]
        if a.limit:
            stats = stats[: a.limit]
        if a.json:
            print(json.dumps([s.__dict__ for s in stats], indent=1))
            return 0
        head = "".join(f" {k[:13]:>13}" for k in shown)
        print(f"{'class':>5}  {'name':<28} {'n':>6} {'beta':>7} {'prob':>6}{head}  wins")
        for s in stats:
            wins = ", ".join(f"{k}={v}" for k, v in s.wins.items())
            cells = "".join(f" {s.mean_metrics.get(k, float('nan')):>13.4f}" for k in shown)
            print(
                f"{s.class_index:>5}  {class_name(names, s.class_index)[:28]:<28} {s.count:>6} "
                f"{s.mean_beta:>7.4f} {s.mean_prob:>6.3f}{cells}  {wins}"
            )
        return 0
    if a.what == "top":
        a.by = a.by or ("beta" if r.layout.has_pool else "prob")
        rows = r.top_k(a.by, a.k, largest=not a.bottom, class_index=a.class_index)
        if a.json:
            print(json.dumps([x.__dict__ for x in rows], indent=1))
            return 0
        print(f"{'row':>8} {a.by:>14}  {'class':<28} {'label':>5}  {'selected':<24} file")
        for x in rows:
            print(
                f"{x.row_id:>8} {x.score:>14.5f}  {class_name(names, x.target)[:28]:<28} "
                f"{x.label:>5}  {x.selected:<24} {x.uri}"
            )
        return 0
    if a.what == "row":
        info = r.row(a.row_id)
        if a.json:
            print(json.dumps(info, indent=1))
            return 0
        t = info.get("target", -1)
        print(f"row {info['row_id']}: {info['uri'] or '<inline image>'}")
        print(f"status: {info['status_name']}" + (f" ({info['error']})" if info["error"] else ""))
        if info["status_name"] == "OK":
            print(f"class explained: {t} {class_name(names, t)}; label {info.get('label')}, "
                  f"predicted {info.get('predicted')}")  # fmt: skip
            print(f"prob {info['prob']:.4f} (baseline {info['baseline_prob']:.4f}); "
                  f"selected {info['selected_name']}")  # fmt: skip
            for name, b in zip(r.pool, info["beta"], strict=True):
                print(f"  beta {b:9.5f}  {name}")
        print(f"original size (h, w) {info['orig_size']}, crop box {info['crop_box']}")
        return 0
    if a.what == "maps":
        import numpy as np

        rows = int_list(a.rows, "--rows")
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        if a.npy or not a.overlay:
            maps = r.maps(rows, method=a.method)
            np.save(out / "maps.npy", maps)
            np.save(out / "row_ids.npy", np.asarray(rows, dtype=np.int64))
            print(
                f"wrote {out / 'maps.npy'} ({maps.shape[0]} x {maps.shape[1]} x {maps.shape[2]} float32)"
            )
        if a.overlay:
            paths = write_overlays(r, rows, out, alpha=a.alpha, cmap=a.cmap, manifest=a.manifest,
                                   class_names=names, method=a.method)  # fmt: skip
            print(f"wrote {len(paths)} overlay PNGs to {out}")
            skipped = len(rows) - len(paths)
            if skipped:
                print(f"skipped {skipped} rows without a map (see 'unioncam status')")
        return 0
    if a.what == "mean":
        import numpy as np
        from PIL import Image

        from pipeline.analysis.images import colorize

        classes = int_list(a.classes, "--classes") if a.classes else None
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        means = r.mean_maps(classes, by=a.by, method=a.method)
        tag = "" if a.method in (None, r.primary) else f"-{a.method}"
        for c, (m, n) in means.items():
            stem = out / f"mean-class-{c:04d}{tag}"
            np.save(f"{stem}.npy", m)
            Image.fromarray(colorize(m, a.cmap)).save(f"{stem}.png")
            print(f"class {c} ({class_name(names, c)}): mean of {n} maps -> {stem}.png")
        if classes is not None:
            empty = [c for c in classes if c not in means]
            if empty:
                print(f"no OK rows for classes {ranges_text(empty)}")
        elif not means:
            print("no OK rows in the store")
        return 0
    raise ValueError(f"unknown query {a.what!r}")
