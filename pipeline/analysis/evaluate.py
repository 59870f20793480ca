"""Faithfulness of explanations for reports: method comparisons on the same images.

A thin layer over :mod:`unioncam.metrics` (where the metrics themselves are defined and
tested); the worker's per-batch metrics are :mod:`pipeline.run.metrics`, and the stored
metrics' names :mod:`pipeline.store.names`.

* :func:`compare_methods` — UnionCAM against its components and the classic CAMs
  (Grad-CAM, Grad-CAM++, Score-CAM, Group-CAM, the denoised map L_den, the fused map
  L_fused) on the same images, with the curves, for :mod:`pipeline.analysis.report`.

Why it is organised this way:

* Cost. Insertion/deletion at RISE's default step (224 pixels per step at 224 px, i.e. 224
  steps) costs ``2 * 223`` forwards per map per image — far more than the explanation
  itself (Score-CAM at EfficientNet-Lite0's ``_blocks.15`` is 320). So every map is scored
  exactly once: :func:`compare_methods` gets all
  component maps from ONE UnionCAM call (``return_components=True`` with several gradient
  and region methods), so Score-CAM's masked forwards run once for Score-CAM, L_fused and
  UnionCAM alike.
* Invariance. :func:`unioncam.metrics.insertion_deletion` builds every masked input from
  its own image, map and step only, so the numbers do not depend on the batch an image
  arrives in or on the chunk size (up to the model's batch numerics, ~1e-6); the tests
  check it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported when a function runs: `import pipeline.analysis.report` and
    # `unioncam --help` stay instant.
    import torch
    from torch import nn


__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "Comparison",
    "MethodScores",
    "compare_methods",
]

#: The methods :func:`compare_methods` knows, in the order a report lists them. Any gradient
#: method of :mod:`unioncam.gradient` (``xgradcam``, ``layercam``, ``denoised-gradcam``...)
#: is accepted too.
METHODS = ("unioncam", "faithful", "gradcam", "gradcam++", "scorecam", "groupcam", "denoised",
           "fused")

METHOD_LABELS = {
    "unioncam": "UnionCAM (paper)",
    "faithful": "UnionCAM (faithful preset, the default)",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "scorecam": "Score-CAM",
    "groupcam": "Group-CAM",
    "denoised": "Denoised (L_den)",
    "fused": "Fused (L_fused)",
    "xgradcam": "XGrad-CAM",
    "layercam": "Layer-CAM",
}

_REGION = ("scorecam", "groupcam")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------
# Method comparison
@dataclass
class MethodScores:
    """One method's maps and scores on a batch (numpy, CPU).

    ``insertion``/``deletion``: AUC per image (``N``); ``*_curve``: ``N x (steps+1)`` class
    probabilities against the fraction of pixels inserted/deleted; ``maps``: ``N x H x W``
    in [0, 1] (``None`` unless asked for).
    """

    insertion: np.ndarray
    deletion: np.ndarray
    insertion_curve: np.ndarray | None = None
    deletion_curve: np.ndarray | None = None
    maps: np.ndarray | None = None

    @property
    def ins_minus_del(self) -> np.ndarray:
        return self.insertion - self.deletion


@dataclass
class Comparison(Mapping[str, MethodScores]):
    """:func:`compare_methods`' result: a read-only mapping ``method -> MethodScores`` plus
    what the methods share (classes explained, probabilities, UnionCAM's selection)."""

    methods: dict[str, MethodScores]
    classes: np.ndarray  # N int64: class explained
    probs: np.ndarray  # N float32: p(x)_c
    selected: np.ndarray  # N int64: index into ``pool`` (UnionCAM's choice)
    pool: tuple[str, ...]  # UnionCAM's (paper) pool: ("region:scorecam", "fused:denoised+scorecam")
    n_steps: int
    step: int
    forwards: dict[str, int] = field(default_factory=dict)  # "explain", "metrics"
    seconds: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, key: str) -> MethodScores:
        return self.methods[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    from unioncam.gradient import GRADIENT_METHODS

    if isinstance(methods, str):
        methods = (methods,)
    known = ("unioncam", "faithful", "fused", *_REGION, *GRADIENT_METHODS)
    out = []
    for m in methods:
        if m not in known:
            raise ValueError(f"methods: unknown method {m!r}; choose from {', '.join(known)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("methods: at least one method is needed")
    return tuple(out)


def compare_methods(
    model: nn.Module,
    x: torch.Tensor,
    targets: Sequence[int | None] | torch.Tensor | None = None,
    layer: str | nn.Module | None = None,
    methods: Sequence[str] = METHODS,
    *,
    step: int = 224,
    chunk_size: int | None = None,
    channels_last: bool | None = None,
    groups: int = 32,
    theta: float = 10.0,
    baseline: str = "zeros",
    autocast: str | None = None,
    return_curves: bool = True,
    return_maps: bool = True,
    insertion_baseline: str = "blur",
    deletion_baseline: str = "zeros",
) -> Comparison:
    """Maps of UnionCAM and of the other methods on the same images, and their
    insertion/deletion scores (RISE, :func:`unioncam.metrics.insertion_deletion`).

    ``methods``: any of :data:`METHODS` (``unioncam`` = the paper's configuration: pool
    {Score-CAM, fused(denoised, Score-CAM)}, selection by confidence gain; ``faithful`` = the
    library's default preset, run as its own UnionCAM call because its pool and selection
    rule differ; ``theta``/``baseline``/``autocast`` and the chunking apply to it too, its
    Group-CAM keeps the preset's 32 groups) or another gradient method name. Every map comes from ONE UnionCAM call with
    ``gradient=(denoised, gradcam, gradcam++, ...)``, ``region=(scorecam[, groupcam])`` and
    ``return_components=True``: one gradient pass, Score-CAM's masked forwards once. The
    paper's UnionCAM is then re-selected from that call's β of ``region:scorecam`` and
    ``fused:denoised+scorecam`` (ties to Score-CAM, as in the library), so it is exactly
    the map ``UnionCAM(model, layer, "paper")`` gives, and its scores are gathered from those two
    members' (no extra forwards).

    ``targets``: the class to explain per image (``None`` = the predicted class).
    ``chunk_size``/``channels_last``: forwards per model call and memory format, for the
    explanations and the metrics alike (``None``: UnionCAM's auto-tuned choice; speed only).
    """
    import torch

    from unioncam import Engine, UnionCAM, UnionCAMConfig
    from unioncam.gradient import GRADIENT_METHODS, GradientCAM
    from unioncam.metrics import insertion_deletion
    from unioncam.union import PRESETS

    methods = check_methods(methods)
    want = set(methods)
    need_paper = bool(want & {"unioncam", "fused"})
    gradient = (["denoised"] if need_paper or "denoised" in want else []) + [
        m for m in methods if m in GRADIENT_METHODS and m != "denoised"
    ]
    region = [r for r in _REGION if r in want or (r == "scorecam" and need_paper)]
    t0 = time.perf_counter()
    comp: dict[str, torch.Tensor] = {}
    if region:
        cfg = UnionCAMConfig(
            gradient=tuple(gradient),
            region=tuple(region),
            include_gradient_maps=False,
            selection="beta",
            theta=theta,
            baseline=baseline,
            groups=groups,
            autocast=autocast,
            chunk_size=chunk_size,
            channels_last=channels_last,
            return_components=True,
        )
        with UnionCAM(model, layer, cfg) as cam:
            res = cam(x, targets)
            tuned_chunk, tuned_cl = cam.chunk_size, bool(cam.channels_last)
        assert res.components is not None and res.beta is not None
        comp = dict(res.components)
        classes, probs, explain_fw = res.target, res.prob, res.forwards
        beta = {p: res.beta[:, i] for i, p in enumerate(res.pool)}
    else:  # gradient maps only: one gradient pass per method, no masked forwards
        tuned_chunk, tuned_cl = chunk_size, bool(channels_last)
        classes = probs = None
        explain_fw = 0
        for g in gradient:
            with GradientCAM(
                model, layer, method=g, theta=theta, chunk_size=chunk_size or 16,
                channels_last=bool(channels_last), autocast=autocast,
            ) as cam:  # fmt: skip
                gres = cam(x, targets)
                comp[f"gradient:{g}"] = gres.maps
                classes, probs = gres.target, gres.prob
            explain_fw += x.shape[0]
        beta = {}
    if "faithful" in want:
        fcfg = replace(PRESETS["faithful"], theta=theta, baseline=baseline, autocast=autocast,
                       chunk_size=chunk_size, channels_last=channels_last)
        with UnionCAM(model, layer, fcfg) as cam:
            fres = cam(x, targets)
            if not region:
                tuned_chunk, tuned_cl = cam.chunk_size, bool(cam.channels_last)
        comp["faithful"] = fres.maps
        explain_fw += fres.forwards
        if classes is None:
            classes, probs = fres.target, fres.prob
    t_explain = time.perf_counter() - t0

    pool = ("region:scorecam", "fused:denoised+scorecam")
    n = x.shape[0]
    if need_paper:
        b_reg, b_fus = beta[pool[0]], beta[pool[1]]
        selected = (b_fus > b_reg).long()  # ties go to the earlier member (Score-CAM)
    else:
        selected = torch.full((n,), -1, dtype=torch.long, device=x.device)

    def key_of(m: str) -> str:
        if m == "faithful":
            return m
        if m == "fused":
            return pool[1]
        if m in _REGION:
            return f"region:{m}"
        return f"gradient:{m}"

    # Distinct maps to score: every requested method but UnionCAM, whose numbers are
    # gathered from its two pool members.
    scored = [m for m in methods if m != "unioncam"]
    for m in ("scorecam", "fused") if "unioncam" in want else ():
        if m not in scored:
            scored.append(m)
    stacked = torch.stack([comp[key_of(m)] for m in scored], 1)
    t1 = time.perf_counter()
    # Scored through an engine with the settings the explanation was tuned to (speed only).
    scorer = Engine(model, chunk_size=tuned_chunk or 16, channels_last=tuned_cl, autocast=autocast)
    r = insertion_deletion(
        scorer, x, stacked, targets=classes, step=step,
        insertion_baseline=insertion_baseline, deletion_baseline=deletion_baseline,
        return_curves=return_curves,
    )  # fmt: skip
    t_metrics = time.perf_counter() - t1
    metric_fw = n * 3 + 2 * n * len(scored) * (r.n_steps - 1)

    out: dict[str, MethodScores] = {}
    for m in methods:
        if m == "unioncam":
            cols = torch.tensor([scored.index("scorecam"), scored.index("fused")], device=x.device)[
                selected
            ]
            idx = cols[:, None]
            ins = r.insertion.gather(1, idx)[:, 0]
            dele = r.deletion.gather(1, idx)[:, 0]
            ic = dc = None
            if return_curves:
                assert r.insertion_curve is not None and r.deletion_curve is not None
                k = r.insertion_curve.shape[-1]
                cidx = idx[:, :, None].expand(n, 1, k)
                ic = r.insertion_curve.gather(1, cidx)[:, 0]
                dc = r.deletion_curve.gather(1, cidx)[:, 0]
            maps = None
            if return_maps:
                both = torch.stack([comp[pool[0]], comp[pool[1]]], 1)
                maps = both[torch.arange(n, device=x.device), selected]
        else:
            j = scored.index(m)
            ins, dele = r.insertion[:, j], r.deletion[:, j]
            ic = r.insertion_curve[:, j] if return_curves else None  # type: ignore[index]
            dc = r.deletion_curve[:, j] if return_curves else None  # type: ignore[index]
            maps = comp[key_of(m)] if return_maps else None
        out[m] = MethodScores(
            insertion=_np(ins),
            deletion=_np(dele),
            insertion_curve=_np(ic) if ic is not None else None,
            deletion_curve=_np(dc) if dc is not None else None,
            maps=_np(maps) if maps is not None else None,
        )
    assert classes is not None and probs is not None
    return Comparison(
        methods=out,
        classes=classes.detach().cpu().numpy().astype(np.int64),
        probs=_np(probs),
        selected=selected.cpu().numpy().astype(np.int64),
        pool=pool,
        n_steps=int(r.n_steps),
        step=int(step),
        forwards={"explain": int(explain_fw), "metrics": int(metric_fw)},
        seconds={"explain": t_explain, "metrics": t_metrics},
    )
