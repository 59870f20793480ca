"""Re-test of the default preset's claim on ROAD (issue 16), with a protocol fixed before
any number was seen.

Protocol (written 2026-12-03, before the first run):

* Model and images: the packaged ImageNet-pretrained EfficientNet-Lite0 at 224 px; the
  **report half** of ``../shared/data/imagenet-sample`` (odd rows of labels.csv, in the
  fixed shuffled order of ``faithfulness_cache.half_rows``), never used for tuning. The
  first 16 images at ``_blocks.15`` and the first 12 at the head (``_swish``, the
  library's automatic layer); fewer only if the run is cut short, and then said so.
* Methods, each explaining the model's predicted class: the default ``faithful`` preset,
  ``paper``, Grad-CAM, Grad-CAM++ and Group-CAM (32 groups).
* Metric: ROAD (``unioncam.road.road``): 10–90 % removal, noise 0.01, seed 0;
  ``road`` = (LeRF − MoRF) / 2, higher is better. All five maps of an image are scored in
  one call, so they are imputed with the same machinery on the same image.
* Statistics: per method the mean; per pair "default − X" the mean paired difference with a
  95 % percentile bootstrap CI over images (2,000 resamples, seed 0). **Decision**: the
  default beats X when the CI's lower end is above 0, loses when its upper end is below
  0, else it is a tie. Whatever comes out goes into docs/faithfulness.md and the README's
  configuration advice.

Descriptive addition (2026-12-03, after the pre-registered results were written): the
components the default is built from and the paper's pool — Score-CAM, the denoised map
L_den and the paper's fused map L_fused — scored on the same images and layers, cached
apart (``components/``) so the pre-registered numbers stay as they were. Their rows carry
no decision; they answer "what does ROAD say about each building block".

Usage: ``python benchmarks/road_study.py`` (resumable: one cached file per image and layer
under ``benchmarks/out/road_study``). Writes ``benchmarks/results/road_study.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from faithfulness_cache import half_rows, paired_bootstrap, rows

from unioncam import UnionCAM, load_model, make_cam
from unioncam.road import road

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
CACHE = REPO / "benchmarks" / "out" / "road_study"
RESULTS = REPO / "benchmarks" / "results"
METHODS = ("faithful", "paper", "gradcam", "gradcam++", "groupcam")
#: descriptive rows (see the docstring): UnionCAM's components, from one paper-config call
COMPONENTS = {"scorecam": "region:scorecam", "denoised": "gradient:denoised",
              "fused": "fused:denoised+scorecam"}
LAYERS = {"_blocks.15": 16, "_swish": 12}


@torch.no_grad()
def explain_target(model, x: torch.Tensor) -> list[int]:
    """The predicted class, the one every method of the study explains."""
    return model(x).argmax(1).tolist()


def explain(model, layer: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each method's map of ``x`` (1×3×H×W) for the model's predicted class."""
    out: dict[str, torch.Tensor] = {}
    target = None
    for m in METHODS:
        cam = (UnionCAM(model, layer, config=m) if m in ("faithful", "paper")
               else make_cam(m, model, layer))  # fmt: skip
        with cam:
            res = cam(x, targets=target)
        target = res.target
        out[m] = res.maps[0]
    out["target"] = target
    return out


def explain_components(model, layer: str, x: torch.Tensor, target) -> dict[str, torch.Tensor]:
    """Score-CAM, L_den and L_fused of ``x`` from one paper-configuration UnionCAM call."""
    with UnionCAM(model, layer, config="paper", return_components=True) as cam:
        res = cam(x, targets=target)
    return {m: res.components[k][0] for m, k in COMPONENTS.items()}


def score_road(model, x: torch.Tensor, maps: dict[str, torch.Tensor], target,
               t0: float) -> dict[str, float]:
    """ROAD, MoRF and LeRF of every method's map of ``x`` (all in one call, so imputed with
    the same machinery), and the seconds since ``t0``: one image's cache record."""
    names = [m for m in maps if m != "target"]
    sal = torch.stack([maps[m] for m in names])[None]  # 1 × M × H × W
    r = road(model, x, sal, targets=target)
    rec = {m: float(r.road[0, k]) for k, m in enumerate(names)}
    rec |= {f"{m}:morf": float(r.morf[0, k]) for k, m in enumerate(names)}
    rec |= {f"{m}:lerf": float(r.lerf[0, k]) for k, m in enumerate(names)}
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop (resumable) after this")
    a = p.parse_args(argv)
    if not (SAMPLE / "labels.csv").exists():
        print(f"needs the ImageNet sample at {SAMPLE}", file=sys.stderr)
        return 2
    loaded = load_model("efficientnet-lite0")
    model, pre = loaded.model, loaded.preprocess
    all_rows = rows()
    order = half_rows("report")
    t_end = time.time() + 60 * a.max_minutes
    results: dict = {"protocol": __doc__.split("Protocol")[1].split("Usage")[0].strip(),
                     "layers": {}}  # fmt: skip
    for layer in a.layers.split(","):
        per_image: list[dict[str, float]] = []
        for i in order[: LAYERS[layer]]:
            stem = Path(all_rows[i]["file"]).stem
            f = CACHE / layer / f"{stem}.json"
            if f.exists():
                per_image.append(json.loads(f.read_text()))
                continue
            if time.time() > t_end:
                break
            from PIL import Image

            x = pre(Image.open(SAMPLE / all_rows[i]["file"]).convert("RGB"))[0][None]
            t = time.perf_counter()
            maps = explain(model, layer, x)
            rec = score_road(model, x, maps, maps["target"], t)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(rec))
            per_image.append(rec)
            print(f"{layer} {stem}: " + " ".join(f"{m}={rec[m]:+.3f}" for m in METHODS)
                  + f" ({rec['seconds']} s)", flush=True)  # fmt: skip
        if not per_image:
            continue
        for i in order[: len(per_image)]:  # the descriptive rows, on the same images
            stem = Path(all_rows[i]["file"]).stem
            f = CACHE / "components" / layer / f"{stem}.json"
            if f.exists() or time.time() > t_end:
                continue
            from PIL import Image

            x = pre(Image.open(SAMPLE / all_rows[i]["file"]).convert("RGB"))[0][None]
            t = time.perf_counter()
            target = explain_target(model, x)
            rec = score_road(model, x, explain_components(model, layer, x, target), target, t)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(rec))
            print(f"{layer} {stem} components: "
                  + " ".join(f"{m}={rec[m]:+.3f}" for m in COMPONENTS)
                  + f" ({rec['seconds']} s)", flush=True)  # fmt: skip
        stems = [Path(all_rows[i]["file"]).stem for i in order[: len(per_image)]]
        comp_files = [CACHE / "components" / layer / f"{st}.json" for st in stems]
        if all(f.exists() for f in comp_files):
            for rec, f in zip(per_image, comp_files, strict=True):
                rec.update(json.loads(f.read_text()) | {"seconds": rec.get("seconds")})
            names = METHODS + tuple(COMPONENTS)
        else:
            names = METHODS
        v = {m: np.array([r[m] for r in per_image]) for m in names}
        layer_res = {"n": len(per_image), "planned_n": LAYERS[layer],
                     "mean": {m: float(v[m].mean()) for m in names},
                     "morf": {m: float(np.mean([r[f"{m}:morf"] for r in per_image]))
                              for m in names},
                     "lerf": {m: float(np.mean([r[f"{m}:lerf"] for r in per_image]))
                              for m in names},
                     "descriptive": [m for m in names if m not in METHODS],
                     "default_minus": {}}  # fmt: skip
        for m in names[1:]:
            mean, lo, hi = paired_bootstrap(v["faithful"] - v[m])
            verdict = "default better" if lo > 0 else f"{m} better" if hi < 0 else "tie"
            layer_res["default_minus"][m] = {"mean": mean, "low": lo, "high": hi,
                                             "verdict": verdict}  # fmt: skip
        results["layers"][layer] = layer_res
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "road_study.json").write_text(json.dumps(results, indent=1))
    md = ["# ROAD re-test of the default preset (issue 16)", "",
          "EfficientNet-Lite0 (pretrained), 224 px, report half of the ImageNet sample; ROAD "
          "10–90 %, higher is better. Protocol: `benchmarks/road_study.py`.", ""]  # fmt: skip
    for layer, lr in results["layers"].items():
        md += [f"## `{layer}`, n = {lr['n']} (planned {lr['planned_n']})", "",
               "| method | ROAD ↑ | MoRF ↓ | LeRF ↑ | default − method [95% CI] | verdict |",
               "|---|---:|---:|---:|---|---|"]  # fmt: skip
        for m in lr["mean"]:
            d = lr["default_minus"].get(m)
            cell = (f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | "
                    + ("(descriptive) " if m in lr.get("descriptive", ()) else "") + d["verdict"]
                    if d else "— | —")  # fmt: skip
            md.append(f"| {m} | {lr['mean'][m]:.3f} | {lr['morf'][m]:.3f} | {lr['lerf'][m]:.3f}"
                      f" | {cell} |")  # fmt: skip
        md.append("")
    (RESULTS / "road_study.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
