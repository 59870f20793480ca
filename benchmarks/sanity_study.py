"""The randomisation sanity check (Adebayo et al., NeurIPS 2018) for the default, the paper's
configuration and each component, at two layers of the pretrained EfficientNet-Lite0
(issue 16). Not a test: it writes a table and the curves for docs/faithfulness.md.

Setup: the report half of ``../shared/data/imagenet-sample`` (the first images of
``faithfulness_cache.half_rows("report")``), 224 px, each method explaining the predicted
class; the cascade re-initialises blocks from the top and runs until two steps past the
one that changes the target layer's output (``pipeline.analysis.report.sanity``, the
code ``unioncam report --sanity`` runs). Criterion: mean Spearman with the original maps
below 0.5 at the layer's step (``unioncam.sanity``).

The head layer has 1,280 channels, so Score-CAM and the paper's configuration cost ~1,300
forwards per image and step there: fewer images at the head.

Usage: ``python benchmarks/sanity_study.py`` (resumable: one cached file per layer and
image under ``benchmarks/out/sanity_study``). Writes ``benchmarks/results/sanity_study.{md,json}``
and ``docs/img/sanity_<layer>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from faithfulness_cache import half_rows, rows

from pipeline.analysis.report.sanity import report_specs, run_sanity
from unioncam import load_model
from unioncam.names import method_label

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
CACHE = REPO / "benchmarks" / "out" / "sanity_study"
RESULTS = REPO / "benchmarks" / "results"
IMG = REPO / "docs" / "img"
METHODS = ("unioncam", "unioncam:paper", "gradcam", "gradcam++", "scorecam", "groupcam",
           "denoised", "fused:denoised+scorecam")
#: Cached per-image files written before the report's one vocabulary used these names.
_OLD_NAMES = {"faithful": "unioncam", "unioncam": "unioncam:paper",
              "fused": "fused:denoised+scorecam"}
LAYERS = {"_blocks.15": 4, "_swish": 2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop (resumable) after this")
    a = p.parse_args(argv)
    if not (SAMPLE / "labels.csv").exists():
        print(f"needs the ImageNet sample at {SAMPLE}", file=sys.stderr)
        return 2
    from PIL import Image

    loaded = load_model("efficientnet-lite0")
    model, pre = loaded.model.eval(), loaded.preprocess
    all_rows, order = rows(), half_rows("report")
    t_end = time.time() + 60 * a.max_minutes
    specs = report_specs(METHODS)
    results: dict = {"setup": __doc__.split("\n\n")[1], "layers": {}}
    for layer in a.layers.split(","):
        per_image = []
        for i in order[: LAYERS[layer]]:
            stem = Path(all_rows[i]["file"]).stem
            f = CACHE / layer / f"{stem}.json"
            if not f.exists():
                if time.time() > t_end:
                    break
                x = pre(Image.open(SAMPLE / all_rows[i]["file"]).convert("RGB"))[0][None]
                t = time.perf_counter()
                rec = run_sanity(model, x, layer, specs)
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(json.dumps(rec))
                print(f"{layer} {stem}: " + " ".join(
                    f"{m}={r['spearman_at_layer']:+.2f}" for m, r in rec.items())
                    + f" ({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
            rec = json.loads(f.read_text())
            if "faithful" in rec:  # an old cache: same maps, old names
                rec = {_OLD_NAMES.get(m, m): r for m, r in rec.items()}
            per_image.append(rec)
        if not per_image:
            continue
        lr = {"n": len(per_image), "planned_n": LAYERS[layer], "methods": {}}
        for m in METHODS:
            recs = [r[m] for r in per_image]
            k = recs[0]["layer_step"]
            steps = recs[0]["steps"]
            sp = np.mean([r["spearman"] for r in recs], 0)
            ss = np.mean([r["ssim"] for r in recs], 0)
            lr["methods"][m] = {"steps": steps, "layer_step": k, "spearman": sp.tolist(),
                                "ssim": ss.tolist(), "spearman_at_layer": float(sp[k]),
                                "ssim_at_layer": float(ss[k]),
                                "passes": bool(sp[k] < recs[0]["threshold"])}  # fmt: skip
        results["layers"][layer] = lr
        _figure(layer, lr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sanity_study.json").write_text(json.dumps(results, indent=1))
    md = ["# Randomisation sanity check (issue 16)", "",
          "EfficientNet-Lite0 (pretrained), 224 px, report half of the ImageNet sample. Mean "
          "Spearman and SSIM of each method's maps with the original ones at the first step "
          "that changes the target layer's output; passes below 0.5 (Spearman). Setup: "
          "`benchmarks/sanity_study.py`.", ""]  # fmt: skip
    for layer, lr in results["layers"].items():
        first = next(iter(lr["methods"].values()))
        md += [f"## `{layer}`, n = {lr['n']} (planned {lr['planned_n']}); layer's step: "
               f"`{first['steps'][first['layer_step']]}` (step {first['layer_step']})", "",
               "| method | Spearman at the layer's step | SSIM | then, two steps on (Spearman) "
               "| verdict |", "|---|---:|---:|---:|---|"]  # fmt: skip
        for m, r in lr["methods"].items():
            md.append(f"| {method_label(m)} | {r['spearman_at_layer']:.2f} | "
                      f"{r['ssim_at_layer']:.2f} | {r['spearman'][-1]:.2f} | "
                      f"{'passes' if r['passes'] else 'fails'} |")  # fmt: skip
        md += ["", f"![sanity curves at {layer}](../../docs/img/sanity_{layer.strip('_')}.png)",
               ""]  # fmt: skip
    (RESULTS / "sanity_study.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


def _figure(layer: str, lr: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = next(iter(lr["methods"].values()))["steps"]
    k = next(iter(lr["methods"].values()))["layer_step"]
    for m, r in lr["methods"].items():
        for ax, key in zip(axes, ("spearman", "ssim"), strict=True):
            ax.plot(np.arange(len(r[key])), r[key], marker="o", ms=3, label=method_label(m),
                    lw=2.2 if m == "unioncam" else 1.2)  # fmt: skip
    for ax, t in zip(axes, ("Spearman", "SSIM"), strict=True):
        ax.set_title(f"{t} with the original maps, {layer} (n = {lr['n']})", fontsize=10)
        ax.set_xticks(np.arange(len(steps)))
        ax.set_xticklabels(steps, rotation=35, ha="right", fontsize=7)
        ax.axvline(k, color="k", ls=":", lw=1)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.5, color="grey", ls="--", lw=0.8)
    axes[1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / f"sanity_{layer.strip('_')}.png", dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
