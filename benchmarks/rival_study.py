"""The default against its rivals (issue 25): the pre-registered comparison.

The protocol was fixed before any rival map was scored and lives in docs/faithfulness.md
("The default against its rivals (issue 25): protocol, written before any scoring"); this
script only carries it out:

* the packaged EfficientNet-Lite0 at 224 px; the report half of the ImageNet sample
  (``faithfulness_cache.half_rows("report")``), the first 20 images at ``_blocks.15`` and
  the first 14 at the head (``_swish``);
* the default ``unioncam``, ``unioncam:paper``, ``fusioncam`` (its paper pairing), ``ablationcam``,
  ``scorecam`` and ``gradcam``, by registry name, one call per method per image, each
  explaining the predicted class;
* insertion − deletion (RISE, blurred insertion start, zeros deletion, 1792 px per step as
  in the report tables of docs/faithfulness.md) and ROAD (10–90 %, noise 0.01, seed 0,
  (LeRF − MoRF) / 2), all six maps of an image in one call of each metric;
* per method the mean; per pair "default − rival" the mean paired difference with a 95 %
  percentile bootstrap CI over images (2,000 resamples, seed 0): the rival is better when
  the CI lies below 0, worse when above, else a tie; per metric family and per layer.

Why a per-image cache: at the head (1,280 channels) Score-CAM, ``unioncam:paper`` and Fusion-CAM
each cost ~1,300 forwards per image; a cut-off run keeps every finished image (one JSON per
image and layer under ``--cache``) and the next run resumes after it.

Usage: ``python benchmarks/rival_study.py`` (the protocol); ``--n-blocks 2 --n-head 1`` for a
smoke run (with ``--out`` elsewhere, so the published results stay as they are);
``--layers _blocks.3:1`` scores any layer on its first n images. Writes
``<out>/rival_study.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from faithfulness_cache import REPORT_STEP, SAMPLE, half_rows, paired_bootstrap, rows

from unioncam import load_model, make_cam
from unioncam.metrics import insertion_deletion
from unioncam.road import road

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "unioncam-rival-study"
DEFAULT = "unioncam"
#: study name -> (registry name, constructor keywords): one call per method per image
METHODS: dict[str, tuple[str, dict]] = {
    "unioncam": ("unioncam", {}),  # the default preset
    "unioncam:paper": ("unioncam", {"config": "paper"}),
    "fusioncam": ("fusioncam", {"config": "paper"}),
    "ablationcam": ("ablationcam", {}),
    "scorecam": ("scorecam", {}),
    "gradcam": ("gradcam", {}),
}
#: the protocol's layers and their planned n
LAYERS = {"_blocks.15": 20, "_swish": 14}
FAMILIES = {"insdel": "insertion − deletion", "road": "ROAD"}
CHUNK = 8


def explain(model, layer: str, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[int], dict]:
    """Each method's map of ``x`` (1×3×H×W) for the predicted class, and its forwards."""
    with torch.no_grad():
        target = model(x).argmax(1).tolist()
    maps, forwards = {}, {}
    for name, (reg, kw) in METHODS.items():
        with make_cam(reg, model, layer, **kw) as cam:
            res = cam(x, targets=target)
        if res.target.tolist() != target:
            raise RuntimeError(f"{name} explained class {res.target.tolist()}, not {target}")
        maps[name], forwards[name] = res.maps[0].float(), int(res.forwards)
    return maps, target, forwards


def score(model, x: torch.Tensor, maps: dict[str, torch.Tensor], target: list[int]) -> dict:
    """Both metric families of all maps of one image, each family in one call."""
    names = list(maps)
    sal = torch.stack([maps[m] for m in names])[None]  # 1 × M × H × W
    cls = torch.tensor(target)
    idl = insertion_deletion(model, x, sal, cls, step=REPORT_STEP, chunk_size=CHUNK)
    rd = road(model, x, sal, cls, chunk_size=CHUNK)
    rec: dict = {}
    for k, m in enumerate(names):
        ins, dele = float(idl.insertion[0, k]), float(idl.deletion[0, k])
        rec[m] = {"insdel": ins - dele, "ins": ins, "del": dele, "road": float(rd.road[0, k]),
                  "morf": float(rd.morf[0, k]), "lerf": float(rd.lerf[0, k])}
    return rec


def parse_layers(spec: str, n_blocks: int | None, n_head: int | None) -> dict[str, int]:
    """``name`` (the protocol's n) or ``name:n`` per comma-separated item."""
    planned = dict(LAYERS)
    if n_blocks is not None:
        planned["_blocks.15"] = n_blocks
    if n_head is not None:
        planned["_swish"] = n_head
    out = {}
    for item in filter(None, spec.split(",")):
        name, _, n = item.partition(":")
        if not n and name not in planned:
            raise SystemExit(f"layer {name!r} has no planned n: write it as {name}:N")
        out[name] = int(n) if n else planned[name]
    return out


def summarise(per_image: list[dict], planned: int, stems: list[str]) -> dict:
    """Means per method, paired default − rival CIs and verdicts per family."""
    v = {m: {k: np.array([r["metrics"][m][k] for r in per_image]) for k in
             ("insdel", "ins", "del", "road", "morf", "lerf")} for m in METHODS}
    out = {"n": len(per_image), "planned_n": planned, "images": stems,
           "mean": {m: {k: float(a.mean()) for k, a in v[m].items()} for m in METHODS},
           "forwards": {m: float(np.mean([r["forwards"][m] for r in per_image]))
                        for m in METHODS},
           "seconds_per_image": float(np.mean([r["seconds"] for r in per_image])),
           "default_minus": {}}  # fmt: skip
    for m in METHODS:
        if m == DEFAULT:
            continue
        out["default_minus"][m] = {}
        for fam in FAMILIES:
            mean, lo, hi = paired_bootstrap(v[DEFAULT][fam] - v[m][fam])
            verdict = "default better" if lo > 0 else f"{m} better" if hi < 0 else "tie"
            out["default_minus"][m][fam] = {"mean": mean, "low": lo, "high": hi,
                                            "verdict": verdict}  # fmt: skip
    return out


def markdown(results: dict) -> str:
    md = ["# The default against its rivals (issue 25)", "",
          "EfficientNet-Lite0 (pretrained), 224 px, report half of the ImageNet sample, the "
          "predicted class. Insertion − deletion: RISE at 1792 px per step, blurred insertion "
          "start; ROAD: 10–90 %, noise 0.01, seed 0, (LeRF − MoRF) / 2. Higher is better for "
          "both. Protocol: docs/faithfulness.md (written before any scoring); script: "
          "`benchmarks/rival_study.py`.", ""]  # fmt: skip
    for layer, lr in results["layers"].items():
        short = " (cut short)" if lr["n"] < lr["planned_n"] else ""
        md += [f"## `{layer}`, n = {lr['n']} (planned {lr['planned_n']}){short}", "",
               "| method | ins − del ↑ | ins ↑ | del ↓ | ROAD ↑ | MoRF ↓ | LeRF ↑ | forwards |",
               "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for m, s in lr["mean"].items():
            label = f"`{m}` (default)" if m == DEFAULT else f"`{m}`"
            md.append(f"| {label} | {s['insdel']:.4f} | {s['ins']:.4f} | {s['del']:.4f} | "
                      f"{s['road']:.4f} | {s['morf']:.4f} | {s['lerf']:.4f} | "
                      f"{lr['forwards'][m]:.0f} |")  # fmt: skip
        md += ["", "| default − rival | ins − del [95% CI] | verdict | ROAD [95% CI] | verdict |",
               "|---|---|---|---|---|"]  # fmt: skip
        for m, fams in lr["default_minus"].items():
            cells = [f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] | {d['verdict']}"
                     for d in (fams[f] for f in FAMILIES)]  # fmt: skip
            md.append(f"| `{m}` | " + " | ".join(cells) + " |")
        md += ["", "Mean seconds per image (six maps and both metrics, this machine's 2 CPU "
               f"cores): {lr['seconds_per_image']:.0f}.", ""]  # fmt: skip
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default=",".join(LAYERS), help="name or name:n, comma-separated")
    p.add_argument("--n-blocks", type=int, help=f"images at _blocks.15 ({LAYERS['_blocks.15']})")
    p.add_argument("--n-head", type=int, help=f"images at _swish ({LAYERS['_swish']})")
    p.add_argument("--cache", type=Path, default=CACHE, help="per-image results (resumable)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where rival_study.{md,json} go")
    p.add_argument("--max-minutes", type=float, default=120.0,
                   help="start no new image after this (finished images stay cached)")
    p.add_argument("--no-compute", action="store_true", help="only summarise the cache")
    a = p.parse_args(argv)
    if not (SAMPLE / "labels.csv").exists():
        print(f"needs the ImageNet sample at {SAMPLE}", file=sys.stderr)
        return 2
    layers = parse_layers(a.layers, a.n_blocks, a.n_head)
    from PIL import Image

    loaded = load_model("efficientnet-lite0")
    model, pre = loaded.model.eval(), loaded.preprocess
    all_rows, order = rows(), half_rows("report")
    t_end = time.time() + 60 * a.max_minutes
    results: dict = {"layers": {}}
    for layer, n in layers.items():
        per_image, stems = [], []
        for i in order[:n]:
            stem = Path(all_rows[i]["file"]).stem
            f = a.cache / layer / f"{stem}.json"
            if not f.exists():
                if a.no_compute or time.time() > t_end:
                    break  # the study's images are a prefix of the order: stop at a gap
                with Image.open(SAMPLE / all_rows[i]["file"]) as img:
                    x = pre(img.convert("RGB"))[0][None]
                t0 = time.perf_counter()
                maps, target, forwards = explain(model, layer, x)
                rec = {"file": all_rows[i]["file"], "target": target[0], "forwards": forwards,
                       "metrics": score(model, x, maps, target)}  # fmt: skip
                rec["seconds"] = round(time.perf_counter() - t0, 1)
                f.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.with_suffix(".tmp")
                tmp.write_text(json.dumps(rec))
                os.replace(tmp, f)
                print(f"{layer} {stem} ({rec['seconds']} s): " + " ".join(
                    f"{m}={r['insdel']:.3f}/{r['road']:.3f}" for m, r in rec["metrics"].items()),
                    flush=True)  # fmt: skip
            per_image.append(json.loads(f.read_text()))
            stems.append(stem)
        if per_image:
            results["layers"][layer] = summarise(per_image, n, stems)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "rival_study.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (a.out / "rival_study.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
