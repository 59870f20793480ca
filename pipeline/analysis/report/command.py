"""``unioncam report`` and ``python -m pipeline.analysis.report``: the report's options.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipeline.analysis.report.config import ReportConfig
from pipeline.analysis.report.render import build_report
from pipeline.data.location import parse_storage_options

__all__ = ['add_report_arguments', 'command_text', 'main', 'report_command', 'report_config']


#: The report's defaults, read from :class:`ReportConfig` (one place for each).
D = ReportConfig.defaults()
#: Flag name -> ReportConfig field, where they differ.
_FIELD = {"bootstrap": "n_boot", "time_budget": "time_budget_s"}


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """The ``report`` subcommand's options (shared by ``unioncam report`` and ``-m``); every
    default is :class:`ReportConfig`'s."""
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for report.md and its PNGs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="summarise a pipeline store (its stored metrics and maps)")
    src.add_argument("--images", metavar="DIR",
                     help="compute on the fly for the images of DIR (labels.csv order if present)")  # fmt: skip
    g = p.add_argument_group("--images mode")
    g.add_argument("--model", default=D["model"])
    g.add_argument("--weights")
    g.add_argument("--layer", help="target layer (default: the model's)")
    g.add_argument("--image-size", type=int, default=D["image_size"])
    g.add_argument("-n", "--limit", dest="n", type=int, help="at most N images")
    g.add_argument("--every", type=int, default=D["every"],
                   help=f"take every k-th image (default {D['every']})")
    g.add_argument("--step", type=int, default=D["step"],
                   help=f"RISE pixels per step (default {D['step']} = 224 steps at 224 px)")  # fmt: skip
    g.add_argument("--methods", default=",".join(D["methods"]),
                   help="comma separated: registered methods (gradcam, scorecam, ...), unioncam "
                        "(the default preset), unioncam:<preset> (unioncam:paper ...), fused "
                        f"pool members (fused:denoised+scorecam); default {','.join(D['methods'])}")  # fmt: skip
    g.add_argument("--groups", type=int, default=D["groups"], help="Group-CAM groups")
    g.add_argument("--batch-size", type=int, default=D["batch_size"],
                   help="images per checkpointed batch")
    g.add_argument("--chunk-size", type=int, help="forwards per model call (speed only)")
    g.add_argument("--target", choices=("predicted", "label"), default=D["target"])
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available; also where "
                        "--store's --sanity runs)")
    g.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no new batch after this long (the report covers what is done)")  # fmt: skip
    g.add_argument("--cache-dir", help="checkpoint folder (default OUT_DIR/.cache)")
    g.add_argument("--keep-cache", action="store_true")
    g = p.add_argument_group("report")
    g.add_argument("--gallery", type=int, default=D["gallery"], help="gallery rows (0 = none)")
    g.add_argument("--bootstrap", type=int, default=D["n_boot"], help="bootstrap resamples")
    g.add_argument("--seed", type=int, default=D["seed"])
    g.add_argument("--by", choices=("target", "label", "predicted"),
                   default=D["by"], help="--store mode: per-class grouping")  # fmt: skip
    g.add_argument("--sanity", type=int, default=D["sanity"], metavar="N",
                   help="randomisation sanity check of every method on N images (default 0 = "
                        "off; ~2-6 explanations per method and image)")  # fmt: skip
    g.add_argument("--title")
    g.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for a remote store (repeatable)")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="no progress lines")


def command_text(a: argparse.Namespace) -> str:
    """The ``unioncam report`` command line of ``a``, leaving out what is a default."""
    parts = ["unioncam report"]
    if a.store:
        parts.append(f"--store {a.store}")
    else:
        parts.append(f"--images {a.images}")
        for k in ("model", "weights", "layer", "image_size", "n", "every", "step", "methods",
                  "groups", "batch_size", "chunk_size", "target", "time_budget"):  # fmt: skip
            v = getattr(a, k)
            default = D.get(_FIELD.get(k, k))
            if k == "methods" and v is not None:
                default = ",".join(default)
            if v is not None and v != default:
                flag = "-n" if k == "n" else "--" + k.replace("_", "-")
                parts.append(f"{flag} {v}")
    for k in ("gallery", "bootstrap", "seed", "sanity"):
        v = getattr(a, k)
        if v != D[_FIELD.get(k, k)]:
            parts.append(f"--{k} {v}")
    parts.append(str(a.out_dir))
    return " ".join(parts)


def report_config(a: argparse.Namespace) -> ReportConfig:
    """The parsed ``report`` options as a :class:`ReportConfig` (a bad value: ReportError)."""
    return ReportConfig(
        store=a.store, images=a.images, storage_options=parse_storage_options(a.storage_option),
        model=a.model, weights=a.weights, layer=a.layer, n=a.n, every=a.every,
        image_size=a.image_size, step=a.step,
        methods=tuple(s.strip() for s in a.methods.split(",") if s.strip()),
        batch_size=a.batch_size, chunk_size=a.chunk_size, groups=a.groups, target=a.target,
        device=a.device, time_budget_s=a.time_budget, cache_dir=a.cache_dir,
        keep_cache=a.keep_cache, gallery=a.gallery, n_boot=a.bootstrap, seed=a.seed, by=a.by,
        sanity=a.sanity, title=a.title, command=command_text(a), progress=not a.quiet,
    )  # fmt: skip


def report_command(a: argparse.Namespace) -> int:
    """Run the parsed ``report`` command; errors propagate (the caller prints one line)."""
    path = build_report(a.out_dir, report_config(a))
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.analysis.report ...``: same options as ``unioncam report``; a bad input
    is one line on stderr and exit code 2."""
    p = argparse.ArgumentParser(prog="unioncam report", description="A Markdown faithfulness report with PNG figures.")
    add_report_arguments(p)
    a = p.parse_args(argv)
    try:
        return report_command(a)
    except KeyboardInterrupt:
        print("unioncam report: interrupted (rerun to continue from the cache)", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("UNIONCAM_DEBUG"):
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, ValueError | OSError):
            text = f"{type(e).__name__}: {text}"
        print(f"unioncam report: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
