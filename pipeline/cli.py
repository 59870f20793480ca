"""The ``unioncam`` command line: manifest, run, status, verify, query, export, analyze,
atlas, demo.

Why it is built this way: every failure a user can cause (a missing folder, a typo in a
layer name, a store made with other settings) must end as ONE line on stderr and exit code
2, never a traceback; so the commands raise ordinary exceptions and :func:`main` turns
them into that line. Set ``UNIONCAM_DEBUG=1`` to see the traceback instead. Heavy imports
(torch, Ray, zarr) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pipeline.data.location import parse_storage_options
from pipeline.messages import error_line, ranges_text

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2
EXIT_FAILED_UNITS = 1
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """An error whose message is shown as is (one line) with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``unioncam run: error: ...``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------
# helpers
def _int_list(text: str, what: str) -> list[int]:
    """``1,2,5-8`` -> [1, 2, 5, 6, 7, 8]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise CLIError(f"{what}: expected integers like 1,2,5-8, got {text!r}") from None
    return out


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec option for s3://, gs:// (repeatable; e.g. endpoint_url=http://host:9000). "
        "Credentials are better left to the environment (AWS_ACCESS_KEY_ID, ...).",
    )


# ---------------------------------------------------------------------------------------
# parser
def build_parser() -> argparse.ArgumentParser:
    from pipeline.run.config import EXPLAINERS, METRICS, TARGETS

    top = _Parser(
        prog="unioncam",
        description="UnionCAM class activation maps for whole datasets (Ray + Zarr).",
        epilog="Start with 'unioncam demo'. Every command has --help.",
    )
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # manifest -------------------------------------------------------------------------
    p = sub.add_parser(
        "manifest",
        help="build a Parquet manifest from an image folder",
        description="Build a manifest (one row per image, one row group per unit of work) "
        "from a folder: ImageNet-train style class subfolders, a flat folder (optionally "
        "with --val-labels), or a CSV list of uri[,label].",
    )
    p.add_argument(
        "image_dir", metavar="IMAGE_DIR", help="folder of images (or a .csv list of uri[,label])"
    )
    p.add_argument("out", metavar="OUT.parquet", help="manifest to write (local path or s3://...)")
    p.add_argument(
        "--layout",
        choices=("auto", "classes", "flat"),
        default="auto",
        help="classes: one subfolder per class (label = sorted index or --classes); "
        "flat: no labels unless --val-labels; auto: detect (default)",
    )
    p.add_argument(
        "--classes",
        metavar="FILE",
        help="class list (CSV like imagenet_classes.csv, or txt of synsets) fixing label indices",
    )
    p.add_argument(
        "--val-labels",
        metavar="FILE",
        help="ImageNet-val ground truth: one label per line in sorted file order, or CSV file,label",
    )
    p.add_argument("--inline", action="store_true", help="embed image bytes in the manifest")
    p.add_argument(
        "--unit-size",
        type=int,
        default=1024,
        metavar="N",
        help="rows per unit (= per Zarr shard; default 1024)",
    )
    _add_storage(p)

    # run ----------------------------------------------------------------------------
    p = sub.add_parser(
        "run",
        help="explain every image of a manifest into a Zarr store (resumable)",
        description="Explain every row of MANIFEST into the Zarr store STORE with Ray actors "
        "(one per GPU, or CPU-only). Rerunning the same command resumes: finished units "
        "(those with a completion marker) are skipped. A store made with other settings or "
        "another manifest is refused unless --overwrite.",
    )
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("store", metavar="STORE", help="Zarr store path or s3://bucket/prefix")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="efficientnet-lite0",
        help="efficientnet-lite0 (built-in, pretrained, default), a torchvision name "
        "(resnet50, ...), timm:<name> (timm:vit_small_patch16_224; needs unioncam[timm]) "
        "or package.module:factory",
    )
    g.add_argument(
        "--weights",
        help="checkpoint file (.safetensors or a weights-only torch file), a torchvision "
        "weights name (IMAGENET1K_V2), or 'pretrained' for timm's own weights from the local "
        "Hugging Face cache (never downloaded); default: the model's built-in or random weights",
    )
    g.add_argument(
        "--layer",
        help="target layer (dotted name; 'name#k' for the k-th call); default: the model's",
    )
    g.add_argument(
        "--image-size",
        type=int,
        metavar="S",
        help="network input side and map size (default: the model's crop size)",
    )
    g.add_argument(
        "--target",
        choices=TARGETS,
        default="predicted",
        help="explain the predicted class (default) or the manifest's label",
    )
    g = p.add_argument_group("method (UnionCAM settings)")
    g.add_argument(
        "--method", default="unioncam",
        help="the CAM method(s), comma separated: unioncam (default; settings below), "
        "gradcam, gradcam++, xgradcam, layercam, denoised, scorecam, groupcam; several "
        "(e.g. gradcam,unioncam) store one map each for the same images",
    )
    g.add_argument(
        "--preset", default=None,
        help="method preset: faithful, paper (the paper's exact method), faithful-fast or fast "
        "(Group-CAM region side); default: the library's unioncam.DEFAULT_PRESET"
    )
    g.add_argument("--region", help="region methods, comma separated (scorecam, groupcam)")
    g.add_argument(
        "--gradient", help="gradient methods, comma separated (denoised, gradcam, ...; '' for none)"
    )
    g.add_argument("--theta", type=float, help="denoising percentile (paper: 10)")
    g.add_argument("--groups", type=int, help="Group-CAM groups")
    g.add_argument(
        "--baseline", choices=("zeros", "blur"), help="baseline input for the confidence gain"
    )
    g.add_argument("--chunk-size", type=int, help="masked forwards per model call (speed only)")
    g.add_argument("--autocast", choices=("bf16", "fp16"), help="mixed precision for the forwards")
    g.add_argument("--components", action="store_true", help="also store every pool member's map")
    g.add_argument(
        "--metrics", help=f"per-image metrics to store, comma separated ({', '.join(METRICS)})"
    )
    g.add_argument(
        "--metrics-all-members",
        action="store_true",
        help="also score every pool member's map (insertion/deletion metrics)",
    )
    g.add_argument(
        "--metric-step",
        type=int,
        default=224,
        help="RISE pixels per insertion/deletion step (default 224)",
    )
    g = p.add_argument_group("execution")
    g.add_argument(
        "--batch-size", type=int, default=32, help="images per UnionCAM call (default 32)"
    )
    g.add_argument(
        "--actors",
        type=int,
        help="number of actors (default: one per GPU, or CPUs // cpus-per-actor)",
    )
    g.add_argument("--cpu", action="store_true", help="CPU-only actors (no GPU requested)")
    g.add_argument("--cpus-per-actor", type=int, help="CPUs per actor (torch threads + decoding)")
    g.add_argument(
        "--decode-threads", type=int, help="decoding threads per actor (default: its CPUs)"
    )
    g.add_argument(
        "--address",
        help="address of an existing Ray cluster ('auto', 'ray://host:10001'); default: start a local one",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace a store made with other settings"
    )
    g.add_argument("--max-retries", type=int, default=3, help="extra attempts per unit (default 3)")
    g.add_argument("--max-units", type=int, help="stop after this many units (resume later)")
    g.add_argument(
        "--explainer",
        choices=EXPLAINERS,
        default="unioncam",
        help="'null' writes zeros without decoding or a model: a benchmarking tool only",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-ray-metrics", action="store_true", help="do not export Ray metrics")
    g.add_argument(
        "--no-dashboard",
        action="store_true",
        help="local Ray without its dashboard (starts faster)",
    )
    _add_storage(p)

    # status ---------------------------------------------------------------------------
    p = sub.add_parser(
        "status", help="where a run stands", description="Units done, rows by status, provenance."
    )
    p.add_argument("store", metavar="STORE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_storage(p)

    # verify ---------------------------------------------------------------------------
    p = sub.add_parser(
        "verify",
        help="check every finished unit's objects against its marker (and repair)",
        description="Check that every unit with a completion marker still has all the "
        "objects it wrote, with the recorded sizes (one listing); --deep also re-reads them "
        "and compares CRC32C checksums and the row counts. One line per bad unit; exit 1 "
        "when any is bad. --repair removes the bad units' markers, so that rerunning the "
        "same 'unioncam run' command redoes exactly those units.",
    )
    p.add_argument("store", metavar="STORE")
    p.add_argument("--deep", action="store_true", help="re-read every object: checksums, rows")
    p.add_argument("--repair", action="store_true", help="remove the markers of bad units")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_storage(p)

    # query ----------------------------------------------------------------------------
    p = sub.add_parser(
        "query",
        help="per-class stats, top-k, maps, overlays, mean maps",
        description="Query a store without loading it whole. Examples: "
        "'unioncam query S classes', 'unioncam query S top --by beta -k 10', "
        "'unioncam query S maps --rows 0,5 --overlay --out DIR', 'unioncam query S mean --classes 281'.",
    )
    p.add_argument("store", metavar="STORE")
    _add_storage(p)
    qs = p.add_subparsers(dest="what", metavar="QUERY", parser_class=_Parser)
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
    from pipeline.analysis.commands import add_analysis_commands, add_strategies_query

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

    # export ---------------------------------------------------------------------------
    p = sub.add_parser(
        "export",
        help="export scores as CSV and/or overlays as PNGs",
        description="Write a CSV of per-row results (status, classes, probabilities, β of "
        "every pool member, selected member) and/or overlay PNGs.",
    )
    p.add_argument("store", metavar="STORE")
    p.add_argument("--csv", metavar="FILE", help="write per-row results to this CSV")
    p.add_argument("--overlays", metavar="DIR", help="write overlay PNGs here")
    p.add_argument(
        "--rows", help="rows for --overlays (default: the --limit OK rows of highest probability)"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=100,
        help="without --rows, overlay the N OK rows with the highest probability (default 100)",
    )
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--cmap", default="jet")
    p.add_argument("--method", help="whose maps, in a store of several methods "
                   "(default: unioncam if stored, else the run's first method)")
    _add_storage(p)

    # analyze / atlas ------------------------------------------------------------------
    add_analysis_commands(sub, _add_storage)

    # report ---------------------------------------------------------------------------
    from pipeline.analysis.report.command import add_report_arguments

    p = sub.add_parser(
        "report",
        help="faithfulness report (Markdown + PNGs) from a store or an image folder",
        description="Mean insertion, deletion and insertion - deletion per method with "
        "bootstrap CIs, paired differences to UnionCAM, mean curves, pool-member selection "
        "frequency and a gallery. --store summarises a run's stored metrics; --images "
        "computes UnionCAM, Grad-CAM, Grad-CAM++, Score-CAM, Group-CAM, L_den and L_fused "
        "on the fly (checkpointed; rerun to resume).",
    )
    add_report_arguments(p)

    # demo -----------------------------------------------------------------------------
    p = sub.add_parser(
        "demo",
        help="explain a few bundled photos (no download) - start here",
        description="Write a handful of scikit-image's bundled photos as JPEGs, build a "
        "manifest, explain them with the packaged EfficientNet-Lite0 on a local CPU-only "
        "Ray instance into OUT/store.zarr, print a summary and write overlay PNGs.",
    )
    p.add_argument("--out", default="unioncam-demo", help="output folder (default ./unioncam-demo)")
    p.add_argument(
        "--preset",
        default="fast",
        help="method preset (default fast: Group-CAM region side, cheap on a CPU; paper = Score-CAM, slow on CPU)",
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--cpus", type=int, help="CPUs for the local Ray instance (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo store")
    return top


# ---------------------------------------------------------------------------------------
# commands
def _cmd_manifest(a: argparse.Namespace) -> int:
    from pipeline.data import build as M

    so = parse_storage_options(a.storage_option)
    src = a.image_dir
    common: dict[str, Any] = {"inline": a.inline, "unit_size": a.unit_size, "storage_options": so}
    if src.lower().endswith((".csv", ".txt")) and not os.path.isdir(src):
        m = M.build_from_list(src, a.out, **common)
    elif a.val_labels:
        m = M.build_from_imagenet_val(src, a.val_labels, a.out, **common)
    else:
        m = M.build_from_folder(src, a.out, layout=a.layout, class_list=a.classes, **common)
    print(
        f"wrote {a.out}: {m.num_rows} rows in {m.num_units} units of {m.unit_size}"
        + (" (with labels)" if m.has_labels else " (no labels)")
    )
    return 0


def _method_from_args(a: argparse.Namespace):
    """The typed method config (``UnionCAMConfig``) the run carries to every actor."""
    from unioncam import DEFAULT_PRESET, UnionCAMConfig

    over: dict[str, Any] = {}
    if a.region is not None:
        over["region"] = tuple(s.strip() for s in a.region.split(",") if s.strip())
    if a.gradient is not None:
        over["gradient"] = tuple(s.strip() for s in a.gradient.split(",") if s.strip())
    for name in ("theta", "groups", "baseline", "chunk_size", "autocast"):
        v = getattr(a, name)
        if v is not None:
            over[name] = v
    return UnionCAMConfig.preset(a.preset or DEFAULT_PRESET, **over)


def _config_from_args(a: argparse.Namespace):
    from pipeline.run.config import RunConfig

    metrics = tuple(s.strip() for s in a.metrics.split(",") if s.strip()) if a.metrics else ()
    method = _method_from_args(a) if a.explainer == "unioncam" else None
    return RunConfig(
        manifest=a.manifest,
        store=a.store,
        model=a.model,
        weights=a.weights,
        layer=a.layer,
        methods=tuple(s.strip() for s in a.method.split(",") if s.strip()),
        **({"method": method} if method is not None else {}),
        image_size=a.image_size,
        target=a.target,
        explainer=a.explainer,
        components=a.components,
        metrics=metrics,
        metrics_all_members=a.metrics_all_members,
        metric_step=a.metric_step,
        batch_size=a.batch_size,
        actors=a.actors,
        cpu_only=a.cpu,
        cpus_per_actor=a.cpus_per_actor,
        decode_threads=a.decode_threads,
        address=a.address,
        overwrite=a.overwrite,
        max_retries=a.max_retries,
        max_units=a.max_units,
        storage_options=parse_storage_options(a.storage_option),
        ray_metrics=not a.no_ray_metrics,
        dashboard=not a.no_dashboard,
        progress=not a.no_progress,
    )


def _cmd_run(a: argparse.Namespace) -> int:
    from pipeline.run.driver import run

    cfg = _config_from_args(a)
    summary = run(cfg)
    print(summary.format())
    return EXIT_FAILED_UNITS if summary.failed_units else 0


def _cmd_status(a: argparse.Namespace) -> int:
    from pipeline.analysis.reader import open_reader

    st = open_reader(a.store, parse_storage_options(a.storage_option)).status()
    if a.json:
        print(json.dumps(st.__dict__, default=str, indent=1))
    else:
        print(st.format())
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from pipeline.store.verify import report_json, verify_store

    report = verify_store(
        a.store, parse_storage_options(a.storage_option), deep=a.deep, repair=a.repair
    )
    print(report_json(report) if a.json else "\n".join(report.lines()))
    return 0 if report.ok else EXIT_FAILED_UNITS


def _cmd_query(a: argparse.Namespace) -> int:
    from pipeline.analysis.reader import open_reader
    from pipeline.data.classes import class_name, load_class_names

    if not a.what:
        raise CLIError(
            "query needs one of: classes, top, row, maps, mean, strategies "
            "(see unioncam query --help)"
        )
    r = open_reader(a.store, parse_storage_options(a.storage_option))
    names = load_class_names()
    if a.what == "strategies" or (a.what == "classes" and a.by not in ("target", "label",
                                                                        "predicted")):
        from pipeline.analysis.commands import query_analysis  # reads the analysis group

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

        rows = _int_list(a.rows, "--rows")
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
            paths = r.write_overlays(
                rows, out, alpha=a.alpha, cmap=a.cmap, manifest=a.manifest, class_names=names,
                method=a.method,
            )
            print(f"wrote {len(paths)} overlay PNGs to {out}")
            skipped = len(rows) - len(paths)
            if skipped:
                print(f"skipped {skipped} rows without a map (see 'unioncam status')")
        return 0
    if a.what == "mean":
        import numpy as np
        from PIL import Image

        from pipeline.analysis.images import colorize

        classes = _int_list(a.classes, "--classes") if a.classes else None
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
    raise CLIError(f"unknown query {a.what!r}")


def _cmd_export(a: argparse.Namespace) -> int:
    from pipeline.analysis.export import export_csv
    from pipeline.analysis.reader import open_reader
    from pipeline.data.classes import load_class_names

    if not a.csv and not a.overlays:
        raise CLIError("export needs --csv FILE and/or --overlays DIR")
    r = open_reader(a.store, parse_storage_options(a.storage_option))
    names = load_class_names()
    if a.csv:
        n = export_csv(r, a.csv, names)
        print(f"wrote {a.csv} ({n} rows)")
    if a.overlays:
        if a.rows:
            rows = _int_list(a.rows, "--rows")
        else:
            rows = [x.row_id for x in sorted(r.top_k("prob", a.limit), key=lambda x: x.row_id)]
        paths = r.write_overlays(rows, a.overlays, alpha=a.alpha, cmap=a.cmap, class_names=names,
                                 method=a.method)
        print(f"wrote {len(paths)} overlay PNGs to {a.overlays}")
    return 0


def _cmd_analysis(a: argparse.Namespace) -> int:
    from pipeline.analysis.commands import analysis_command  # analyze, atlas

    return analysis_command(a, parse_storage_options(a.storage_option))


def _cmd_report(a: argparse.Namespace) -> int:
    from pipeline.analysis.report.command import report_command

    return report_command(a)


def _cmd_demo(a: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(
        out=a.out, preset=a.preset, image_size=a.image_size, cpus=a.cpus, overwrite=a.overwrite
    )


#: Errors whose message is meant for the user as is (no exception type in front).
_BARE = (CLIError, ValueError, FileNotFoundError, FileExistsError, PermissionError)

COMMANDS = {
    "manifest": _cmd_manifest,
    "run": _cmd_run,
    "status": _cmd_status,
    "verify": _cmd_verify,
    "query": _cmd_query,
    "export": _cmd_export,
    "analyze": _cmd_analysis,
    "atlas": _cmd_analysis,
    "report": _cmd_report,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unioncam`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as e:
        from pipeline.run.signals import Stopped, why_stopped

        e = why_stopped(e)
        if isinstance(e, Stopped):  # SIGTERM / SIGHUP: exit 128 + signal, as a shell would
            if not e.reported:
                print(f"unioncam: {e} (rerun the same command to resume)", file=sys.stderr)
            return e.exit_code
        print("unioncam: interrupted (rerun the same command to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as e:  # one line, no traceback (UNIONCAM_DEBUG=1 shows it)
        if os.environ.get("UNIONCAM_DEBUG"):
            raise
        print(f"unioncam {args.command}: error: {error_line(e, bare=_BARE)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
