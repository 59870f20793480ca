"""The command-line faces of the dataset analysis: ``analyze``, ``atlas``, and the
``query`` views that read the ``analysis`` group (``classes --by <descriptor>``,
``strategies``).

Why here and not in :mod:`pipeline.cli`: the CLI stays a thin table of commands; the
arguments and printing of the analysis live next to the analysis (like ``report``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from pipeline.analysis.descriptors import DESCRIPTORS

__all__ = [
    "CLASS_SORT_KEYS",
    "add_analysis_commands",
    "add_analyze_arguments",
    "add_atlas_arguments",
    "add_strategies_query",
    "query_analysis",
    "analyze_command",
    "atlas_command",
    "query_class_table",
    "query_strategies",
]

#: What ``query STORE classes --by`` sorts by when the store has an analysis.
CLASS_SORT_KEYS = (*DESCRIPTORS, "energy_in_box", "max_in_box", "box_iou", "clever_hans",
                   "spearman", "top_iou", "count")


def query_analysis(a: argparse.Namespace, reader: Any, names: list[str]) -> int:
    """``query STORE strategies`` and ``query STORE classes --by <descriptor>``."""
    if a.what == "strategies":
        return query_strategies(reader, a.class_index, a.group, a.json, names)
    return query_class_table(reader, a.by, a.limit, a.json, a.ascending, names)


def add_analysis_commands(sub: Any, add_storage: Callable[[argparse.ArgumentParser], None]
                          ) -> None:  # fmt: skip
    """The ``analyze`` and ``atlas`` subcommands (``add_storage`` adds --storage-option)."""
    p = sub.add_parser(
        "analyze",
        help="descriptors, per-class tables, strategies (and a comparison) into the store",
        description="Analyse every finished unit of STORE into its 'analysis' group: "
        "per-row descriptors (centre of mass, spread, area, entropy, centre bias, border), "
        "per-class means, strategies per class or group with Clever-Hans scores; with "
        "--boxes, localisation; with --compare, agreement with another store. Rerun to "
        "cover new units.",
    )
    p.set_defaults(handler=analyze_command)
    add_analyze_arguments(p)
    add_storage(p)
    p = sub.add_parser(
        "atlas",
        help="a static website to browse the analysis (opens from file://)",
        description="Write an HTML site (no network needed): classes and groups sortable "
        "by any descriptor, a page per group with its strategies and overlays.",
    )
    p.set_defaults(handler=atlas_command)
    add_atlas_arguments(p)
    add_storage(p)


def add_strategies_query(qs: Any) -> None:
    """``query STORE strategies``."""
    q = qs.add_parser("strategies", help="strategies of a class or group (after analyze); "
                      "without --class/--group the Clever-Hans ranking")  # fmt: skip
    q.add_argument("--class", dest="class_index", type=int, help="a class (shows its group)")
    q.add_argument("--group", help="a group by name")
    q.add_argument("--json", action="store_true")


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE")
    p.add_argument(
        "--groups", default="auto", metavar="SOURCE",
        help="which classes are clustered together: 'class' (each class alone), 'imagenet' "
        "(the shipped WordNet grouping of ImageNet's 1,000 classes), a CSV class_index,group, "
        "or 'auto' (default: class when the median class has >= 20 rows, else imagenet)",
    )  # fmt: skip
    p.add_argument(
        "--compare", metavar="OTHER_STORE",
        help="also compare the maps with another store over the same manifest (another "
        "model); the store itself with --compare-maps compares two methods",
    )  # fmt: skip
    p.add_argument(
        "--compare-maps", metavar="A,B",
        help="map arrays to compare: this store's A with the other's B (default maps,maps; "
        "e.g. maps,methods/gradcam or maps,components/region_groupcam)",
    )  # fmt: skip
    p.add_argument(
        "--boxes", metavar="FILE",
        help="object boxes for localisation scores: ImageNet's LOC_val_solution.csv, or a "
        "CSV uri,class,x1,y1,x2,y2 (original pixels, one box per line)",
    )  # fmt: skip
    p.add_argument("--sample-per-group", type=int, default=500,
                   help="rows clustered per group (the rest are assigned; default 500)")
    p.add_argument("--force", action="store_true", help="recompute everything")
    p.add_argument(
        "--address",
        help="describe units as Ray tasks on this Ray cluster ('auto', 'ray://host:10001'); "
        "default: one after the other in this process",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def analyze_command(a: argparse.Namespace, storage_options: dict[str, Any] | None) -> int:
    from pipeline.analysis.store_analysis import AnalysisConfig, analyze

    if a.compare_maps and not a.compare:
        raise ValueError("--compare-maps needs --compare OTHER_STORE (give the store itself "
                         "to compare two of its methods)")
    maps = tuple(s.strip() for s in (a.compare_maps or "maps,maps").split(","))
    if len(maps) != 2 or not all(maps):
        raise ValueError(f"--compare-maps: expected A,B, got {a.compare_maps!r}")
    cfg = AnalysisConfig(groups=a.groups, sample_per_group=a.sample_per_group, boxes=a.boxes)
    if a.address:
        import ray

        ray.init(address=a.address, logging_level="ERROR")
    try:
        s = analyze(a.store, config=cfg, compare=a.compare, compare_maps=maps,  # type: ignore[arg-type]
                    storage_options=storage_options, force=a.force)  # fmt: skip
    finally:
        if a.address:
            import ray

            ray.shutdown()
    print(json.dumps(s.__dict__, default=str, indent=1) if a.json else s.format())
    if a.compare:
        from pipeline.analysis.reader import open_reader

        res = open_reader(a.store, storage_options).analysis()
        if res is not None and res.compare is not None:
            at = dict(res.compare.attrs)
            print(f"compared with {at.get('other')} ({at.get('rows_compared')} rows): mean "
                  f"spearman {_f(at.get('spearman_mean'))}, mean top-15% IoU "
                  f"{_f(at.get('top_iou_mean'))}")  # fmt: skip
    return 0


def add_atlas_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE")
    p.add_argument("--out", required=True, help="folder for the site (index.html inside)")
    p.add_argument("--manifest", help="manifest to find the photos (default: the store's)")
    p.add_argument("--exemplars", type=int, default=4, help="overlays per strategy (default 4)")


def atlas_command(a: argparse.Namespace, storage_options: dict[str, Any] | None) -> int:
    from pipeline.analysis.atlas import write_atlas
    from pipeline.analysis.reader import open_reader

    site = write_atlas(open_reader(a.store, storage_options), a.out, manifest=a.manifest,
                       exemplars=a.exemplars)  # fmt: skip
    print(f"wrote {site.pages} pages and {site.images} images to {a.out}; open "
          f"{site.index} in a browser")  # fmt: skip
    return 0


def _f(v: Any, digits: int = 4) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _analysis_or_error(reader: Any) -> Any:
    res = reader.analysis()
    if res is None:
        raise ValueError(f"{reader.path} has no analysis yet: run 'unioncam analyze "
                         f"{reader.path}' first")  # fmt: skip
    return res


def query_class_table(reader: Any, by: str, limit: int, as_json: bool, ascending: bool,
                      names: list[str]) -> int:  # fmt: skip
    """``query STORE classes --by <descriptor>``: the analysis's class table sorted."""
    from pipeline.data.classes import class_name

    if by not in CLASS_SORT_KEYS:
        raise ValueError(f"--by {by!r}: choose target, label, predicted or one of "
                         f"{', '.join(CLASS_SORT_KEYS)}")  # fmt: skip
    res = _analysis_or_error(reader)
    table = res.class_table()
    if by in ("spearman", "top_iou") and (not table or by not in table[0]):
        raise ValueError(f"--by {by}: the analysis has no comparison (analyze --compare)")
    if by in ("energy_in_box", "max_in_box", "box_iou") and (not table or by not in table[0]):
        raise ValueError(f"--by {by}: the analysis has no boxes (analyze --boxes FILE)")
    sign = 1.0 if ascending else -1.0
    table.sort(key=lambda r: (math.isnan(float(r[by])), sign * float(r[by]), r["class"]))
    if limit:
        table = table[:limit]
    if as_json:
        print(json.dumps(table, indent=1))
        return 0
    cols = [by] + [d for d in ("centre_bias", "border", "spread", "entropy") if d != by]
    print(f"{'class':>5}  {'name':<24} {'group':<16} {'n':>5} "
          + " ".join(f"{c[:11]:>11}" for c in cols))  # fmt: skip
    for r in table:
        print(f"{r['class']:>5}  {class_name(names, r['class'])[:24]:<24} {r['group'][:16]:<16} "
              f"{r['count']:>5} " + " ".join(f"{_f(r[c]):>11}" for c in cols))  # fmt: skip
    if not res.complete:
        print("(the analysis covers only the units finished when it ran)")
    return 0


def query_strategies(reader: Any, class_index: int | None, group: str | None, as_json: bool,
                     names: list[str]) -> int:  # fmt: skip
    """``query STORE strategies --class C | --group NAME``, or the Clever-Hans ranking."""
    from pipeline.data.classes import class_name

    res = _analysis_or_error(reader)
    if class_index is None and group is None:
        ranking = res.clever_hans_ranking()
        if as_json:
            print(json.dumps(ranking, indent=1))
            return 0
        print(f"{'group':<24} {'clever-hans':>11}  k   rows")
        table = {r["group"]: r for r in res.group_table()}
        for g, score in ranking:
            print(f"{g[:24]:<24} {score:>11.4f}  {table[g]['k']}  {table[g]['count']:>5}")
        return 0
    g = group if group is not None else res.group_of_class(int(class_index or 0))
    st = res.strategies(g)
    if as_json:
        d = {k: v for k, v in st.__dict__.items() if k not in ("centroids", "mean_map")}
        print(json.dumps(d, indent=1))
        return 0
    what = f"class {class_index} ({class_name(names, int(class_index))}) is in group {g!r}" \
        if class_index is not None else f"group {g!r}"  # fmt: skip
    split = (f"silhouette {st.silhouette:.3f}" if st.k > 1
             else "not split: no split reached a silhouette of 0.5")  # fmt: skip
    print(f"{what}: {st.count} rows, {len(st.classes)} classes, {st.k} "
          f"strateg{'y' if st.k == 1 else 'ies'} ({split})")  # fmt: skip
    print(f"clever-hans score {st.clever_hans:.4f}"
          + (f" (strategy {st.clever_hans_strategy})" if st.clever_hans_strategy >= 0 else ""))
    for j in range(st.k):
        print(f"  strategy {j}: {st.sizes[j]} rows; exemplar rows "
              f"{', '.join(str(r) for r in st.exemplars[j]) or '-'}")  # fmt: skip
    print(f"  most off-object rows (border mass): {', '.join(map(str, st.off_object)) or '-'}")
    return 0
