"""``unioncam report`` and ``python -m pipeline.analysis.report``: the report's options.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipeline.analysis.evaluate import (
    METHODS,
)
from pipeline.analysis.report.render import build_report
from pipeline.data.location import parse_storage_options

__all__ = ['add_report_arguments', 'command_text', 'main', 'report_command']


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """The ``report`` subcommand's options (shared by ``unioncam report`` and ``-m``)."""
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for report.md and its PNGs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="summarise a pipeline store (its stored metrics and maps)")
    src.add_argument("--images", metavar="DIR",
                     help="compute on the fly for the images of DIR (labels.csv order if present)")  # fmt: skip
    g = p.add_argument_group("--images mode")
    g.add_argument("--model", default="efficientnet-lite0")
    g.add_argument("--weights")
    g.add_argument("--layer", help="target layer (default: the model's)")
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("-n", "--limit", dest="n", type=int, help="at most N images")
    g.add_argument("--every", type=int, default=1, help="take every k-th image (default 1)")
    g.add_argument("--step", type=int, default=224,
                   help="RISE pixels per step (default 224 = 224 steps at 224 px)")  # fmt: skip
    g.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma separated (default {','.join(METHODS)})")  # fmt: skip
    g.add_argument("--groups", type=int, default=32, help="Group-CAM groups")
    g.add_argument("--batch-size", type=int, default=2, help="images per checkpointed batch")
    g.add_argument("--chunk-size", type=int, help="forwards per model call (speed only)")
    g.add_argument("--target", choices=("predicted", "label"), default="predicted")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available; also where "
                        "--store's --sanity runs)")
    g.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no new batch after this long (the report covers what is done)")  # fmt: skip
    g.add_argument("--cache-dir", help="checkpoint folder (default OUT_DIR/.cache)")
    g.add_argument("--keep-cache", action="store_true")
    g = p.add_argument_group("report")
    g.add_argument("--gallery", type=int, default=6, help="gallery rows (0 = none)")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--by", choices=("target", "label", "predicted"),
                   default="target", help="--store mode: per-class grouping")  # fmt: skip
    g.add_argument("--sanity", type=int, default=0, metavar="N",
                   help="randomisation sanity check of every method on N images (default 0 = "
                        "off; ~2-6 explanations per method and image)")  # fmt: skip
    g.add_argument("--title")
    g.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for a remote store (repeatable)")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="no progress lines")


def command_text(a: argparse.Namespace) -> str:
    parts = ["unioncam report"]
    if a.store:
        parts.append(f"--store {a.store}")
    else:
        parts.append(f"--images {a.images}")
        defaults = {"model": "efficientnet-lite0", "image_size": 224, "every": 1, "step": 224,
                    "methods": ",".join(METHODS), "groups": 32, "batch_size": 2,
                    "target": "predicted"}  # fmt: skip
        for k in ("model", "weights", "layer", "image_size", "n", "every", "step", "methods",
                  "groups", "batch_size", "chunk_size", "target", "time_budget"):  # fmt: skip
            v = getattr(a, k)
            if v is not None and v != defaults.get(k):
                flag = "-n" if k == "n" else "--" + k.replace("_", "-")
                parts.append(f"{flag} {v}")
    for k in ("gallery", "bootstrap", "seed", "sanity"):
        v = getattr(a, k)
        if v != {"gallery": 6, "bootstrap": 2000, "seed": 0, "sanity": 0}[k]:
            parts.append(f"--{k} {v}")
    parts.append(str(a.out_dir))
    return " ".join(parts)


def report_command(a: argparse.Namespace) -> int:
    """Run the parsed ``report`` command; errors propagate (the caller prints one line)."""
    so = parse_storage_options(a.storage_option)
    methods = tuple(s.strip() for s in a.methods.split(",") if s.strip())
    path = build_report(
        a.out_dir, store=a.store, image_dir=a.images, model=a.model, weights=a.weights,
        layer=a.layer, n=a.n, every=a.every, image_size=a.image_size, step=a.step,
        methods=methods, batch_size=a.batch_size, chunk_size=a.chunk_size, groups=a.groups,
        target=a.target, seed=a.seed, n_boot=a.bootstrap, gallery=a.gallery, by=a.by,
        cache_dir=a.cache_dir, keep_cache=a.keep_cache, time_budget_s=a.time_budget,
        storage_options=so, title=a.title, command=command_text(a), progress=not a.quiet,
        device=a.device, sanity=a.sanity,
    )  # fmt: skip
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
