"""Faithfulness of explanations for reports: method comparisons on the same images.

A thin layer over :mod:`unioncam.metrics` (where the metrics themselves are defined and
tested); the worker's per-batch metrics are :mod:`pipeline.run.metrics`, and the stored
metrics' names :mod:`pipeline.store.names`.

* :func:`compare_methods` — UnionCAM's presets against their components and the classic
  CAMs (Grad-CAM, Grad-CAM++, Score-CAM, Group-CAM, the denoised map L_den, the fused map
  L_fused) on the same images, with the curves, for :mod:`pipeline.analysis.report`. Methods
  are named as everywhere else (:mod:`unioncam.names`): ``unioncam`` is the default preset,
  ``unioncam:paper`` the paper's configuration.

Why it is organised this way:

* Cost. Insertion/deletion at RISE's default step (224 pixels per step at 224 px, i.e. 224
  steps) costs ``2 * 223`` forwards per map per image — far more than the explanation
  itself (Score-CAM at EfficientNet-Lite0's ``_blocks.15`` is 320). So every map is scored
  exactly once: :func:`compare_methods` gets all
  component maps from ONE :meth:`unioncam.UnionCAM.pool_maps` call (several gradient and
  region methods), so Score-CAM's masked forwards run once for Score-CAM, L_fused and
  UnionCAM alike; the preset then selects from that pool with the library's rule.
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
    "DEFAULT_METHODS",
    "Comparison",
    "MethodScores",
    "check_methods",
    "compare_methods",
]

#: What :func:`compare_methods` (and so ``unioncam report --images``) compares when not told:
#: the paper's UnionCAM first (the reference), the default preset, the classic CAMs, and the
#: paper's two components. Names are :mod:`unioncam.names`' (the registry's, ``unioncam:<preset>``
#: and the fused pool members); this is a choice from that vocabulary, not a second one.
DEFAULT_METHODS = ("unioncam:paper", "unioncam", "gradcam", "gradcam++", "scorecam", "groupcam",
                   "denoised", "fused:denoised+scorecam")

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
    what the methods share (classes explained, probabilities, the reference UnionCAM's
    selection)."""

    methods: dict[str, MethodScores]
    classes: np.ndarray  # N int64: class explained
    probs: np.ndarray  # N float32: p(x)_c
    selected: np.ndarray  # N int64: index into ``pool``: the reference UnionCAM's choice (-1: none)
    pool: tuple[str, ...]  # the reference UnionCAM's pool (``unioncam:paper``: region:scorecam, fused:…)
    reference: str | None  # the first UnionCAM of ``methods`` (``None``: none asked for)
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
    """``methods`` in their one spelling (:func:`unioncam.names.check_method`), duplicates
    dropped; a bad name is one ``ValueError`` line naming the choices."""
    from unioncam.names import check_method

    if isinstance(methods, str):
        methods = (methods,)
    out: list[str] = []
    for m in methods:
        try:
            m = check_method(m)
        except ValueError as e:
            raise ValueError(f"methods: {e}") from None
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
    methods: Sequence[str] = DEFAULT_METHODS,
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

    ``methods``: names of :mod:`unioncam.names` — any registered method (``gradcam``,
    ``scorecam``, ``fusioncam``, …), ``unioncam`` (the default preset) or
    ``unioncam:<preset>`` (``unioncam:paper``: pool {Score-CAM, fused(denoised, Score-CAM)},
    selection by confidence gain), and fused pool members (``fused:denoised+scorecam``, the
    paper's L_fused). ``theta``/``baseline``/``autocast`` and the chunking apply to every
    method; ``groups`` to Group-CAM (a preset keeps its own: the default's 32).

    The gradient and region methods, the fused members and every preset selected by β with
    these settings (``unioncam:paper``; ``unioncam:fast`` when ``groups`` is its 32) come
    from ONE shared :meth:`UnionCAM.pool_maps` call: one gradient pass, Score-CAM's masked
    forwards once. Each such preset then selects from that pool with the library's own rule
    (:meth:`UnionCAM.select`), so its map is exactly what ``UnionCAM(model, layer, preset)``
    gives, and its scores are gathered from its members' (no extra forwards). A preset with
    a probing rule (the default's ``insdel-8``) or other settings, and a method that is
    neither a gradient nor a region method (``finercam``, ``fusioncam``, ``ablationcam``),
    runs as its own call.

    ``targets``: the class to explain per image (``None`` = the predicted class).
    ``chunk_size``/``channels_last``: forwards per model call and memory format, for the
    explanations and the metrics alike (``None``: UnionCAM's auto-tuned choice; speed only).
    """
    import torch

    from unioncam import Engine, UnionCAM, UnionCAMConfig, make_cam
    from unioncam.cam import validate_inputs
    from unioncam.gradient import GRADIENT_METHODS, GradientCAM
    from unioncam.metrics import insertion_deletion
    from unioncam.names import method_config, split_fused
    from unioncam.selection import SELECTION_RULES
    from unioncam.union import PRESETS

    methods = check_methods(methods)
    validate_inputs(x, targets)
    x = x.float()
    presets = {m: c for m in methods if (c := method_config(m)) is not None}

    def shares(cfg: UnionCAMConfig) -> bool:
        rule = SELECTION_RULES.info(cfg.selection)
        return (rule["per_member"] == 0 and rule["per_image"] == 0 and cfg.theta == theta
                and cfg.baseline == baseline and cfg.autocast == autocast
                and ("groupcam" not in cfg.region or cfg.groups == groups))  # fmt: skip

    shared = [m for m, c in presets.items() if shares(c)]
    fused = [m for m in methods if m.startswith("fused:")]
    plain_gradient = [m for m in methods if m in GRADIENT_METHODS and m not in presets]
    own = [m for m in methods if m not in shared and m not in fused and m not in plain_gradient
           and m not in _REGION]  # fmt: skip
    need_g = [g for m in shared for g in presets[m].gradient] + [split_fused(m)[0] for m in fused]  # type: ignore[index]
    need_r = [r for m in shared for r in presets[m].region] + [split_fused(m)[1] for m in fused]  # type: ignore[index]
    gradient = ["denoised"] if "denoised" in need_g or "denoised" in plain_gradient else []
    for g in [*plain_gradient, *need_g]:
        if g not in gradient:
            gradient.append(g)
    region = [r for r in _REGION if r in methods or r in need_r]

    t0 = time.perf_counter()
    comp: dict[str, torch.Tensor] = {}
    results: dict[str, object] = {}  # preset name -> its CAMResult
    tuned: tuple[int | None, bool] | None = None
    classes = probs = None
    explain_fw = 0
    if region:
        cfg = UnionCAMConfig(
            gradient=tuple(gradient), region=tuple(region), include_gradient_maps=False,
            selection="beta", theta=theta, baseline=baseline, groups=groups, autocast=autocast,
            chunk_size=chunk_size, channels_last=channels_last, return_components=True,
        )  # fmt: skip
        with UnionCAM(model, layer, cfg) as cam:
            pm = cam.pool_maps(x, targets)
            tuned = cam.chunk_size, bool(cam.channels_last)
        comp = dict(pm.maps)
        classes, probs, explain_fw = pm.fwd.target, pm.fwd.prob, pm.forwards
        for m in shared:
            pcfg = replace(presets[m], chunk_size=tuned[0], channels_last=tuned[1])
            with UnionCAM(model, layer, pcfg) as pcam:
                res = pcam.select(x, pm)
            results[m] = res
            explain_fw += res.forwards - pm.forwards  # what its rule spent (β: nothing)
    else:  # gradient maps only: one gradient pass per method, no masked forwards
        for g in gradient:
            with GradientCAM(
                model, layer, method=g, theta=theta, chunk_size=chunk_size or 16,
                channels_last=bool(channels_last), autocast=autocast,
            ) as gcam:  # fmt: skip
                gres = gcam(x, targets)
                comp[f"gradient:{g}"] = gres.maps
                classes, probs = gres.target, gres.prob
            explain_fw += x.shape[0]
    speed = {"chunk_size": chunk_size, "channels_last": channels_last, "autocast": autocast}
    for m in own:
        if m in presets or m == "fusioncam":
            base_cfg = presets.get(m) or PRESETS["paper"]
            kw: dict = {"config": replace(base_cfg, theta=theta, baseline=baseline, **speed)}
        else:
            kw = dict(speed)
        with make_cam(m.partition(":")[0], model, layer, **kw) as ocam:
            ores = ocam(x, targets)
            if tuned is None:
                tuned = ocam.chunk_size, bool(ocam.channels_last)
        comp[m] = ores.maps
        explain_fw += ores.forwards
        if m in presets:
            results[m] = ores
        if classes is None:
            classes, probs = ores.target, ores.prob
    t_explain = time.perf_counter() - t0
    if tuned is None:
        tuned = chunk_size, bool(channels_last)

    def key_of(m: str) -> str:
        if m in own or m in fused:
            return m
        if m in _REGION:
            return f"region:{m}"
        return f"gradient:{m}"

    # Distinct maps to score: every requested method but the shared presets, whose numbers
    # are gathered from their pool members'.
    scored = [key_of(m) for m in methods if m not in shared]
    for m in shared:
        scored += [k for k in results[m].pool if k not in scored]  # type: ignore[attr-defined]
    n = x.shape[0]
    stacked = torch.stack([comp[k] for k in scored], 1)
    t1 = time.perf_counter()
    # Scored through an engine with the settings the explanation was tuned to (speed only).
    scorer = Engine(model, chunk_size=tuned[0] or 16, channels_last=tuned[1], autocast=autocast)
    r = insertion_deletion(
        scorer, x, stacked, targets=classes, step=step,
        insertion_baseline=insertion_baseline, deletion_baseline=deletion_baseline,
        return_curves=return_curves,
    )  # fmt: skip
    t_metrics = time.perf_counter() - t1
    metric_fw = n * 3 + 2 * n * len(scored) * (r.n_steps - 1)

    out: dict[str, MethodScores] = {}
    for m in methods:
        if m in shared:
            res = results[m]
            cols = torch.tensor([scored.index(k) for k in res.pool],  # type: ignore[attr-defined]
                                device=x.device)[res.selected]  # type: ignore[attr-defined]
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
            maps = res.maps if return_maps else None  # type: ignore[attr-defined]
        else:
            j = scored.index(key_of(m))
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
    reference = next((m for m in methods if m in presets), None)
    if reference is not None:
        selected, pool = results[reference].selected, results[reference].pool  # type: ignore[attr-defined]
    else:
        selected, pool = torch.full((n,), -1, dtype=torch.long), ()
    return Comparison(
        methods=out,
        classes=classes.detach().cpu().numpy().astype(np.int64),
        probs=_np(probs),
        selected=selected.cpu().numpy().astype(np.int64),
        pool=tuple(pool),
        reference=reference,
        n_steps=int(r.n_steps),
        step=int(step),
        forwards={"explain": int(explain_fw), "metrics": int(metric_fw)},
        seconds={"explain": t_explain, "metrics": t_metrics},
    )
