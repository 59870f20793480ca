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
from pipeline.flags import comma_list, flag_values
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
    """Every subcommand; each names its body with ``set_defaults(handler=...)``."""
    top = _Parser(
        prog="unioncam",
        description="UnionCAM class activation maps for whole datasets (Ray + Zarr).",
        epilog="Start with 'unioncam demo'. Every command has --help.",
    )
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_manifest(sub)
    _add_run(sub)
    _add_status_verify(sub)

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
    p.set_defaults(handler=_cmd_report)

    _add_demo(sub)
    return top


def _add_manifest(sub: Any) -> None:
    p = sub.add_parser(
        "manifest",
        help="build a Parquet manifest from an image folder, a list or shards",
        description="Build a manifest (one row per image, one row group per unit of work) "
        "from a folder: ImageNet-train style class subfolders, a flat folder (optionally "
        "with --val-labels), a CSV list of uri[,label], or shards read in place: WebDataset "
        ".tar files (key.jpg + key.cls) or Parquet files with an image column (datasets).",
    )
    p.set_defaults(handler=_cmd_manifest)
    p.add_argument("image_dir", metavar="DATASET",
                   help="folder of images, a .csv list of uri[,label], or shards (file/folder)")
    p.add_argument("--format", choices=("auto", "webdataset", "parquet"), default="auto",
                   help="auto (default): shards when DATASET holds only .tar or .parquet files")
    p.add_argument("--label-column", metavar="NAME",
                   help="shards: label member (WebDataset, default cls) or column (label)")
    p.add_argument("out", metavar="OUT.parquet", help="manifest to write (local path or s3://...)")
    p.add_argument("--layout", choices=("auto", "classes", "flat"), default="auto",
                   help="classes: one subfolder per class (label = sorted index or --classes); "
                   "flat: no labels unless --val-labels; auto: detect (default)")  # fmt: skip
    p.add_argument("--classes", metavar="FILE", help="class list (CSV like "
                   "imagenet_classes.csv, or txt of synsets) fixing label indices")  # fmt: skip
    p.add_argument("--val-labels", metavar="FILE", help="ImageNet-val ground truth: one label "
                   "per line in sorted file order, or CSV file,label")  # fmt: skip
    p.add_argument("--inline", action="store_true", help="embed image bytes in the manifest")
    p.add_argument("--unit-size", type=int, default=1024, metavar="N",
                   help="rows per unit (= per Zarr shard; default 1024)")
    _add_storage(p)


def _add_run(sub: Any) -> None:
    """``run``: one flag per :class:`~pipeline.config.RunConfig` field (same name, default
    and help, :mod:`pipeline.flags`), plus the flags overriding the preset's fields."""
    from pipeline.config import UNIONCAM_GROUP, RunConfig
    from pipeline.flags import add_flags

    p = sub.add_parser(
        "run",
        help="explain every image of a manifest into a Zarr store (resumable)",
        description="Explain every row of MANIFEST into the Zarr store STORE with Ray actors "
        "(one per GPU, or CPU-only). Rerunning the same command resumes: finished units "
        "(those with a completion marker) are skipped. A store made with other settings or "
        "another manifest is refused unless --overwrite.",
    )
    p.set_defaults(handler=_cmd_run)
    g = add_flags(p, RunConfig)[UNIONCAM_GROUP]
    # UnionCAMConfig's fields; unset (None) = the preset's value
    g.add_argument("--region", help="region methods, comma separated (scorecam, groupcam)")
    g.add_argument("--gradient",
                   help="gradient methods, comma separated (denoised, gradcam, ...; '' for none)")
    g.add_argument("--theta", type=float, help="denoising percentile (paper: 10)")
    g.add_argument("--groups", type=int, help="Group-CAM groups")
    g.add_argument("--baseline", choices=("zeros", "blur"),
                   help="baseline input for the confidence gain")
    g.add_argument("--chunk-size", type=int, help="masked forwards per model call (speed only)")
    g.add_argument("--autocast", choices=("bf16", "fp16"), help="mixed precision for the forwards")
    _add_storage(p)


def _add_status_verify(sub: Any) -> None:
    p = sub.add_parser(
        "status", help="where a run stands", description="Units done, rows by status, provenance."
    )
    p.set_defaults(handler=_cmd_status)
    p.add_argument("store", metavar="STORE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_storage(p)

    p = sub.add_parser(
        "verify",
        help="check every finished unit's objects against its marker (and repair)",
        description="Check that every unit with a completion marker still has all the "
        "objects it wrote, with the recorded sizes (one listing); --deep also re-reads them "
        "and compares CRC32C checksums and the row counts. One line per bad unit; exit 1 "
        "when any is bad. --repair removes the bad units' markers, so that rerunning the "
        "same 'unioncam run' command redoes exactly those units.",
    )
    p.set_defaults(handler=_cmd_verify)
    p.add_argument("store", metavar="STORE")
    p.add_argument("--deep", action="store_true", help="re-read every object: checksums, rows")
    p.add_argument("--repair", action="store_true", help="remove the markers of bad units")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_storage(p)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="explain a few bundled photos (no download) - start here",
        description="Write a handful of scikit-image's bundled photos as JPEGs, build a "
        "manifest, explain them with the packaged EfficientNet-Lite0 on a local CPU-only "
        "Ray instance into OUT/store.zarr, print a summary and write overlay PNGs.",
    )
    p.set_defaults(handler=_cmd_demo)
    p.add_argument("--out", default="unioncam-demo", help="output folder (default ./unioncam-demo)")
    p.add_argument("--preset", default="fast", help="method preset (default fast: Group-CAM "
                   "region side, cheap on a CPU; paper = Score-CAM, slow on CPU)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--cpus", type=int, help="CPUs for the local Ray instance (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo store")


# ---------------------------------------------------------------------------------------
# commands
def _cmd_manifest(a: argparse.Namespace, storage_options: dict[str, Any] | None) -> int:
    from pipeline.data import build as M
    from pipeline.data.build_shards import build_from_shards, detect_shards

    so = storage_options
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


def _preset_from_args(a: argparse.Namespace) -> Any:
    """``--preset`` (or the library's default) with the fields its flags override."""
    from unioncam import DEFAULT_PRESET, UnionCAMConfig

    over = {k: getattr(a, k) for k in ("theta", "groups", "baseline", "chunk_size", "autocast")
            if getattr(a, k) is not None}  # fmt: skip
    for k in ("region", "gradient"):
        if getattr(a, k) is not None:
            over[k] = comma_list(getattr(a, k))
    return UnionCAMConfig.preset(a.preset or DEFAULT_PRESET, **over)


def _config_from_args(a: argparse.Namespace) -> Any:
    """The :class:`~pipeline.config.RunConfig` of ``unioncam run``'s arguments (the seam
    the signal and node-loss tests wrap to add fault injection)."""
    from pipeline.config import RunConfig

    kw = flag_values(RunConfig, a)
    if a.explainer == "unioncam":
        kw["preset"] = _preset_from_args(a)
    else:  # no method runs: its settings are not even checked
        kw.pop("preset", None)
    return RunConfig(**kw, storage_options=parse_storage_options(a.storage_option))


def _cmd_run(a: argparse.Namespace, storage_options: dict[str, Any] | None) -> int:
    from pipeline.run.driver import run

    summary = run(_config_from_args(a))
    print(summary.format())
    return EXIT_FAILED_UNITS if summary.failed_units else 0


def _cmd_status(a: argparse.Namespace, storage_options: dict[str, Any] | None) -> int:
    from pipeline.analysis.reader import open_reader
    from pipeline.analysis.status import store_status

    st = store_status(open_reader(a.store, storage_options))
    if a.json:
        print(json.dumps(st.__dict__, default=str, indent=1))
    else:
        print(st.format())
    return 0


def _cmd_verify(a: argparse.Namespace, storage_options: dict[str, Any] | None) -> int:
    from pipeline.store.verify import report_json, verify_store

    report = verify_store(a.store, storage_options, deep=a.deep, repair=a.repair)
    print(report_json(report) if a.json else "\n".join(report.lines()))
    return 0 if report.ok else EXIT_FAILED_UNITS


def _cmd_report(a: argparse.Namespace, storage_options: dict[str, Any] | None) -> int:
    from pipeline.analysis.report.command import report_command

    return report_command(a)  # it reads --storage-option itself


def _cmd_demo(a: argparse.Namespace, storage_options: dict[str, Any] | None) -> int:
    from pipeline.demo import run_demo

    return run_demo(
        out=a.out, preset=a.preset, image_size=a.image_size, cpus=a.cpus, overwrite=a.overwrite
    )


#: Errors whose message is meant for the user as is (no exception type in front).
_BARE = (CLIError, ValueError, FileNotFoundError, FileExistsError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unioncam`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        # every subcommand names its body (set_defaults): handler(args, fsspec options)
        return args.handler(args, parse_storage_options(getattr(args, "storage_option", None)))
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
