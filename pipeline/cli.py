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
from typing import Any, NoReturn

from pipeline.data.location import parse_storage_options
from pipeline.messages import error_line

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
    from pipeline.config import EXPLAINERS, METRICS, TARGETS

    top = _Parser(
        prog="unioncam",
        description="UnionCAM class activation maps for whole datasets (Ray + Zarr).",
        epilog="Start with 'unioncam demo'. Every command has --help.",
    )
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # manifest -------------------------------------------------------------------------
    p = sub.add_parser(
        "manifest",
        help="build a Parquet manifest from an image folder, a list or shards",
        description="Build a manifest (one row per image, one row group per unit of work) "
        "from a folder: ImageNet-train style class subfolders, a flat folder (optionally "
        "with --val-labels), a CSV list of uri[,label], or shards read in place: WebDataset "
        ".tar files (key.jpg + key.cls) or Parquet files with an image column (datasets).",
    )
    p.add_argument("image_dir", metavar="DATASET",
                   help="folder of images, a .csv list of uri[,label], or shards (file/folder)")
    p.add_argument("--format", choices=("auto", "webdataset", "parquet"), default="auto",
                   help="auto (default): shards when DATASET holds only .tar or .parquet files")
    p.add_argument("--label-column", metavar="NAME",
                   help="shards: label member (WebDataset, default cls) or column (label)")
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
        help="network input side (default: the model's crop size)",
    )
    g.add_argument(
        "--map-size",
        type=int,
        metavar="S",
        help="side of the stored maps (default: the input side, lossless); smaller stores "
        "each map area-downsampled: 56 is 1/16 of the bytes (docs/store.md)",
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
    from pipeline.analysis.commands import add_analysis_commands
    from pipeline.analysis.query import add_query_command

    add_query_command(sub, _Parser, _add_storage)

    # export ---------------------------------------------------------------------------
    from pipeline.analysis.export import add_export_command

    add_export_command(sub, _add_storage)

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
    from pipeline.data.build_shards import build_from_shards, detect_shards

    so = parse_storage_options(a.storage_option)
    src = a.image_dir
    common: dict[str, Any] = {"inline": a.inline, "unit_size": a.unit_size, "storage_options": so}
    if (kind := detect_shards(src, so) if a.format == "auto" else a.format) is not None:
        m = build_from_shards(src, a.out, kind=kind, label=a.label_column,
                              class_list=a.classes, **common)  # fmt: skip
    elif src.lower().endswith((".csv", ".txt")) and not os.path.isdir(src):
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
    from pipeline.config import RunConfig

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
        map_size=a.map_size,
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
    from pipeline.analysis.status import store_status

    st = store_status(open_reader(a.store, parse_storage_options(a.storage_option)))
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
    from pipeline.analysis.query import query_command

    return query_command(a, parse_storage_options(a.storage_option))


def _cmd_export(a: argparse.Namespace) -> int:
    from pipeline.analysis.export import export_command

    return export_command(a, parse_storage_options(a.storage_option))


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
