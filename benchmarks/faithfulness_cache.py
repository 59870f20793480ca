"""Per-image cache for the faithfulness study: every candidate map once, every metric once.

Why a cache: on a 2-core CPU one 224-px forward of EfficientNet-Lite0 costs
20–100 ms, Score-CAM at the head is 1280 of them and the RISE metric at its
default 224 px per step is 446 per map. Every selection rule studied here only
*chooses* among the same candidate maps, so each map is computed once per
image, its metrics once, and any rule is then evaluated offline for free.
Per-member rule scores are cached the same way (every rule here scores each
member on its own, so a pool's choice is the argmax over its members' cached
scores, in the pool's order — exactly what ``UnionCAM.__call__`` does).

One file per image under ``<cache>/<layer>/<stem>.pt``, written atomically, so
an interrupted run resumes where it stopped. Which metrics an image gets
depends on its half (:func:`half_of`): the *tune* half gets the cheap 16-step
RISE curves of every candidate (enough to tune rules), the *report* half gets
RISE at :data:`REPORT_STEP` px per step (and, for a few images, at the
metric's default 224 px per step) for the maps the report needs.
"""

from __future__ import annotations

import csv
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from unioncam import UnionCAM, UnionCAMConfig, load_model
from unioncam.engine import Engine
from unioncam.gradient import gradient_map
from unioncam.metrics import average_drop_increase, insertion_deletion
from unioncam.ops import minmax, upsample
from unioncam.selection import SELECTION_RULES

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
CACHE = REPO / "benchmarks" / "out" / "faithfulness"
SIZE = 224
CHUNK = 8

# Everything any studied configuration can select: the union of their pools.
ALL_CONFIG = UnionCAMConfig(gradient=("denoised", "gradcam", "gradcam++"),
                            region=("scorecam", "groupcam"), include_gradient_maps=True,
                            selection="beta", chunk_size=CHUNK, channels_last=False, return_components=True)
CANDIDATES = ALL_CONFIG.pool
# The components the issue compares against: the report half always gets their RISE-224.
COMPONENTS = ("region:scorecam", "fused:denoised+scorecam", "gradient:denoised",
              "gradient:gradcam", "gradient:gradcam++")
THETAS = (0.0, 90.0)  # denoising thresholds tried on the tune half (10 is in CANDIDATES)

# Rule scores computed directly on every candidate (tune: insdel-S comes from the 16-step curves).
TUNE_RULES = ("beta-blur", "drop-20", "keep-remove-10", "keep-remove-20")
TUNE_STEPS = 16  # tune-half RISE: step = 224*224/16 = 3136 px, so insdel-{2,4,8,16} are read off
# Report-half RISE: 1792 px per step (28 steps; the issue's own setting). The metric's default
# 224 px per step costs 8x more forwards (446 per map); on the shared 2-core CPU (0.15-0.3 s per
# forward measured under load) it is run only on a validation subset (--validate).
REPORT_STEP = 1792
SWAP_STEP = 3136  # the other-baseline RISE: 16 steps, baselines swapped (1792 default: from curves)


def rows() -> list[dict[str, str]]:
    with open(SAMPLE / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def half_rows(half: str) -> list[int]:
    """Row indices of a half: even rows tune, odd rows report, in a fixed shuffled order.

    Shuffled (seed 0) because labels.csv is sorted by class: the first rows of a
    half would be all animals. The first n of this order are the study's n images.
    """
    if half not in ("tune", "report"):
        raise ValueError(f"half must be 'tune' or 'report', got {half!r}")
    idx = [i for i in range(len(rows())) if i % 2 == (0 if half == "tune" else 1)]
    random.Random(0).shuffle(idx)
    return idx


def paired_bootstrap(d: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of the paired differences ``d`` (one per image) and its 95 % percentile bootstrap
    CI over images: the statistic every pre-registered study here decides on."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n, len(d)))
    means = d[idx].mean(1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def half_of(row: int) -> str:
    return "tune" if row % 2 == 0 else "report"


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """TorchScript-frozen copy (BatchNorm folded): ~1.5x faster forwards on this CPU.

    Only used for metric and rule-score forwards; checked against the eager
    model on every start (max |Δp| must stay below 1e-5).
    """
    ex = torch.randn(CHUNK, 3, SIZE, SIZE)
    with torch.no_grad():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, ex)))
        probe = torch.randn(3, 3, SIZE, SIZE)
        diff = (frozen(probe).softmax(1) - model(probe).softmax(1)).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"frozen model differs from the eager one by {diff:.2e} in probability")
    return frozen


class Study:
    """Computes and caches one layer's candidate maps, rule scores and metrics."""

    def __init__(self, layer: str, cache: Path = CACHE) -> None:
        self.layer = layer
        self.dir = cache / layer.replace("#", "_call")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.loaded = load_model("efficientnet-lite0")
        self.model = self.loaded.model
        self.frozen = frozen_copy(self.model)
        # The library's engine on the frozen copy: the rules of unioncam.selection run as is.
        self.engine = Engine(self.frozen, chunk_size=CHUNK, channels_last=False)
        self.rows = rows()

    # ------------------------------------------------------------------ io
    def path(self, row: int) -> Path:
        return self.dir / (Path(self.rows[row]["file"]).stem + ".pt")

    def load(self, row: int) -> dict | None:
        p = self.path(row)
        return torch.load(p, weights_only=False) if p.exists() else None

    def save(self, row: int, rec: dict) -> None:
        p = self.path(row)
        tmp = p.with_suffix(".tmp")
        torch.save(rec, tmp)
        os.replace(tmp, p)

    def image(self, row: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(SAMPLE / self.rows[row]["file"]) as img:
            return self.loaded.preprocess(img)[0][None]

    # ------------------------------------------------------------------ stages
    def candidates(self, row: int) -> dict:
        """Stage 1: every candidate map, its β, the forwards it took, and the θ variants."""
        x = self.image(row)
        t0 = time.perf_counter()
        with UnionCAM(self.model, self.layer, ALL_CONFIG) as cam:
            res = cam(x)
            cam_s = time.perf_counter() - t0
            rec = {
                "row": row, "file": self.rows[row]["file"], "label": int(self.rows[row]["class_index"]),
                "half": half_of(row), "layer": self.layer, "layer_resolved": str(cam.layer),
                "x": x, "class": int(res.target[0]), "prob": float(res.prob[0]),
                "p_zero": float(res.baseline_prob[0]),
                "maps": {k: res.components[k][0].clone() for k in CANDIDATES},
                "beta": {k: float(res.beta[0, i]) for i, k in enumerate(CANDIDATES)},
                "forwards_all": res.forwards, "cam_seconds": cam_s,
            }
            # Score-CAM's own forwards = total − everything else UnionCAM spent (batch of one):
            # gradient pass 1, Group-CAM 32 + 1, zeros baseline 1, β of 5 components, β of 6 fused.
            rec["scorecam_forwards"] = res.forwards - (1 + 33 + 1 + 5 + 6)
            if half_of(row) == "tune":
                fwd = cam.gradient_pass(x, res.target)
                sc = res.components["region:scorecam"]
                base = res.baseline_prob
                b_sc = res.beta[:, CANDIDATES.index("region:scorecam")]
                for th in THETAS:
                    den = minmax(upsample(gradient_map("denoised", fwd.activation, fwd.gradient, th),
                                          (SIZE, SIZE)))
                    b_den = cam.confidence_gain(x, den[:, None], res.target, base)[:, 0]
                    fused = minmax(b_den[:, None, None] * den + b_sc[:, None, None] * sc)
                    b_f = cam.confidence_gain(x, fused[:, None], res.target, base)[:, 0]
                    tag = f"@theta{th:g}"
                    rec["maps"][f"gradient:denoised{tag}"] = den[0].clone()
                    rec["maps"][f"fused:denoised{tag}+scorecam"] = fused[0].clone()
                    rec["beta"][f"gradient:denoised{tag}"] = float(b_den[0])
                    rec["beta"][f"fused:denoised{tag}+scorecam"] = float(b_f[0])
        rec.update(rules={}, metrics={}, seconds={"cam": cam_s})
        return rec

    def names(self, rec: dict) -> list[str]:
        return list(rec["maps"])

    def rule_scores(self, rec: dict, rules: tuple[str, ...], members: list[str] | None = None) -> bool:
        """Stage 2: per-member scores of the given rules (the library's rule functions).

        Every rule here scores each member on its own, so scores are cached per
        member and a pool's choice is the first maximum over its members.
        """
        members = list(members or CANDIDATES)
        cls = torch.tensor([rec["class"]])
        changed = False
        for r in rules:
            have = rec["rules"].setdefault(r, {})
            todo = [k for k in members if k not in have]
            if not todo:
                continue
            stacked = torch.stack([rec["maps"][k] for k in todo])[None]
            beta = torch.tensor([[rec["beta"][k] for k in todo]])
            t0 = time.perf_counter()
            with self.engine:
                s, f = SELECTION_RULES[r](self.engine, rec["x"], stacked, cls, beta)
            have.update({k: float(s[0, i]) for i, k in enumerate(todo)})
            rec["seconds"][f"rule:{r}"] = rec["seconds"].get(f"rule:{r}", 0.0) + time.perf_counter() - t0
            changed = True
        return changed

    def metrics(self, rec: dict, names: list[str], kinds: tuple[str, ...]) -> bool:
        """Stage 3: the metrics ``kinds`` of the maps ``names`` that do not have them yet.

        ``rise224``: RISE with its defaults (224 px per step, blur insertion, zeros deletion),
        curves kept; ``rise1792``: the same at 1792 px per step; ``rise16``: the same at 16 steps (tune half); ``swap``: 3136 px per
        step with the baselines swapped (insertion from zeros, deletion to blur);
        ``adrop``: Average Drop / Increase in Confidence.
        """
        x, cls = rec["x"], torch.tensor([rec["class"]])
        changed = False
        for kind in kinds:
            store = rec["metrics"].setdefault(kind, {})
            todo = [k for k in names if k not in store]
            if not todo:
                continue
            sal = torch.stack([rec["maps"][k] for k in todo])[None]
            t0 = time.perf_counter()
            if kind in ("rise224", "rise1792", "rise16"):
                step = {"rise224": 224, "rise1792": REPORT_STEP,
                        "rise16": SIZE * SIZE // TUNE_STEPS}[kind]
                r = insertion_deletion(self.frozen, x, sal, cls, step=step, chunk_size=CHUNK,
                                       return_curves=True)
                for i, k in enumerate(todo):
                    store[k] = {"ins": float(r.insertion[0, i]), "del": float(r.deletion[0, i]),
                                "ins_curve": r.insertion_curve[0, i].clone(),
                                "del_curve": r.deletion_curve[0, i].clone()}
            elif kind == "swap":
                r = insertion_deletion(self.frozen, x, sal, cls, step=SWAP_STEP, chunk_size=CHUNK,
                                       insertion_baseline="zeros", deletion_baseline="blur")
                for i, k in enumerate(todo):
                    store[k] = {"ins": float(r.insertion[0, i]), "del": float(r.deletion[0, i])}
            elif kind == "adrop":
                drop, inc = average_drop_increase(self.frozen, x, sal, cls, chunk_size=CHUNK)
                for i, k in enumerate(todo):
                    store[k] = {"drop": float(drop[0, i]), "inc": bool(inc[0, i])}
            else:
                raise ValueError(f"unknown metric kind {kind!r}")
            rec["seconds"][f"{kind}"] = rec["seconds"].get(kind, 0.0) + time.perf_counter() - t0
            changed = True
        return changed

    def ensure(self, row: int, extra: list[str] | None = None, extra_rules: tuple[str, ...] = (),
               members: list[str] | None = None, validate: bool = False) -> dict:
        """Bring one image's record up to what its half needs (resumable, saved after each stage).

        Tune half: the tune rules on every candidate, 16-step RISE and ADrop of every map.
        Report half: RISE at ``REPORT_STEP`` and the swapped-baseline RISE of the five
        components plus ``extra`` maps, ADrop of every candidate, ``extra_rules`` on
        ``members``; ``validate`` adds RISE at 224 px per step for the same maps.
        """
        rec = self.load(row)
        if rec is None:
            rec = self.candidates(row)
            self.save(row, rec)
        if rec["half"] == "tune":
            plan = [(self.rule_scores, (rec, TUNE_RULES + tuple(extra_rules))),
                    (self.metrics, (rec, self.names(rec), ("rise16", "adrop")))]
        else:
            need = list(dict.fromkeys([*COMPONENTS, *(extra or [])]))
            kinds = ("rise1792", "swap") + (("rise224",) if validate else ())
            plan = [(self.metrics, (rec, list(CANDIDATES), ("adrop",))),
                    (self.metrics, (rec, need, kinds)),
                    (self.rule_scores, (rec, tuple(extra_rules), members))]
        for fn, args in plan:
            if fn(*args):
                self.save(row, rec)
        return rec


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="fill the faithfulness cache (resumable)")
    ap.add_argument("--layer", required=True)
    ap.add_argument("--half", choices=("tune", "report"), required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    study = Study(a.layer)
    for j, row in enumerate(half_rows(a.half)[: a.n]):
        t0 = time.perf_counter()
        rec = study.ensure(row)
        print(f"[{a.layer} {a.half}] {j + 1}/{a.n} {rec['file']} class {rec['class']} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
