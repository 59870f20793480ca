"""UnionCAM: denoise, fuse by confidence gain, select the best map of the pool.

With a target class c, a baseline input x_b (zeros of the normalised space by
default) and p(·) = softmax(f(·))_c:

1. Denoising module — ``L_den``: see :mod:`unioncam.gradient` (``denoised``).
2. Region module — ``L_reg``: Score-CAM, see :mod:`unioncam.region`.
3. Confidence gain — β(L) = p(x ⊙ L) − p(x_b).
4. Union — L_fused = minmax(β(L_den)·L_den + β(L_reg)·L_reg).
5. Selection — pool {L_reg, L_fused}; keep the member with the highest β
   (ties go to the earlier member, so L_fused only when strictly greater).

Generalised without losing that case: ``gradient`` and ``region`` are lists;
the pool is every region map, then every fused (gradient, region) pair, then —
only with ``include_gradient_maps`` — the gradient maps themselves.

All masked forwards (region masks, then the β of every component, then the β
of every fused map) are batched across images and chunked; the baseline
forward runs once per batch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from unioncam.base import AUTOCAST_DTYPES, BaseCAM, validate_inputs
from unioncam.gradient import GRADIENT_METHODS, gradient_map
from unioncam.metrics import gaussian_blur
from unioncam.ops import minmax, upsample
from unioncam.region import REGION_METHODS, group_cam, score_cam
from unioncam.selection import SELECTIONS

__all__ = ["UnionCAMConfig", "UnionCAMResult", "UnionCAM", "PRESETS", "DEFAULT_PRESET", "BASELINES"]

BASELINES = ("zeros", "blur")


@dataclass(frozen=True)
class UnionCAMConfig:
    """Every setting of the method; the defaults are the paper's configuration.

    Settings that change results (``gradient``, ``region``, ``theta``,
    ``baseline``, ``groups``, ``include_gradient_maps``, ``autocast``) are part
    of :meth:`fingerprint`; speed-only settings (``chunk_size``,
    ``channels_last``) are not, because they do not change the maps.
    """

    gradient: tuple[str, ...] = ("denoised",)
    region: tuple[str, ...] = ("scorecam",)
    theta: float = 10.0
    baseline: str = "zeros"
    groups: int = 32
    include_gradient_maps: bool = False
    selection: str = "beta"
    autocast: str | None = None
    chunk_size: int | None = None
    channels_last: bool | None = None
    return_components: bool = False
    name: str = field(default="paper", compare=False)

    def __post_init__(self) -> None:
        for attr in ("gradient", "region"):
            value = getattr(self, attr)
            if isinstance(value, str):
                object.__setattr__(self, attr, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, attr, tuple(value))
        for g in self.gradient:
            if g not in GRADIENT_METHODS:
                raise ValueError(f"gradient: unknown method {g!r}; choose from {', '.join(GRADIENT_METHODS)}")
        for r in self.region:
            if r not in REGION_METHODS:
                raise ValueError(f"region: unknown method {r!r}; choose from {', '.join(REGION_METHODS)}")
        if not self.region:
            raise ValueError("region: at least one region method is needed (the pool's first member)")
        if not 0.0 <= float(self.theta) <= 100.0:
            raise ValueError(f"theta must be a percentile in [0, 100], got {self.theta}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be a positive int, got {self.groups!r}")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {self.autocast!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UnionCAMConfig:
        """A named configuration (see :data:`PRESETS`), optionally with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @property
    def pool(self) -> tuple[str, ...]:
        """Names of the pool members, in selection order."""
        names = [f"region:{r}" for r in self.region]
        names += [f"fused:{g}+{r}" for g in self.gradient for r in self.region]
        if self.include_gradient_maps:
            names += [f"gradient:{g}" for g in self.gradient]
        return tuple(names)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gradient"], d["region"] = list(self.gradient), list(self.region)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnionCAMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UnionCAMConfig settings: {', '.join(sorted(unknown))}")
        return cls(**d)

    def fingerprint(self) -> str:
        """The settings that change results, as canonical JSON."""
        keep = ("gradient", "region", "theta", "baseline", "groups", "include_gradient_maps",
                "selection", "autocast")
        d = self.to_dict()
        return json.dumps({k: d[k] for k in keep}, sort_keys=True)


PRESETS: dict[str, UnionCAMConfig] = {
    "paper": UnionCAMConfig(name="paper"),
    # Group-CAM instead of Score-CAM as the region side: 32 masked forwards per
    # image instead of one per channel, for whole-dataset runs on a budget.
    "fast": UnionCAMConfig(region=("groupcam",), groups=32, name="fast"),
    # Chosen on the tune half of the faithfulness study (benchmarks/faithfulness_frontier.py,
    # benchmarks/results/faithfulness_protocol.md): a 7-member pool — Group-CAM, the denoised,
    # Grad-CAM and Grad-CAM++ maps, and each fused with Group-CAM — kept by an 8-step
    # insertion − deletion proxy instead of β, which rewards broad maps. 143 forwards per
    # image whatever the layer's width (Score-CAM alone is one per channel).
    "faithful": UnionCAMConfig(gradient=("denoised", "gradcam", "gradcam++"), region=("groupcam",),
                               groups=32, include_gradient_maps=True, selection="insdel-8",
                               name="faithful"),
    # Same pool, kept by the drop of p_c when its top 20 % of pixels are removed: one forward
    # per member, 50 forwards per image.
    "faithful-fast": UnionCAMConfig(gradient=("denoised", "gradcam", "gradcam++"),
                                    region=("groupcam",), groups=32, include_gradient_maps=True,
                                    selection="drop-20", name="faithful-fast"),
}

# The preset to use when none is named. "faithful" met the pre-registered decision rule of
# benchmarks/results/faithfulness_protocol.md on the report half (EfficientNet-Lite0,
# _blocks.15, n = 20: insertion − deletion +0.047 [+0.025, +0.073] over Grad-CAM, the best
# component, and above every other component with CIs excluding 0; no loss on swapped-baseline
# RISE, Average Drop or Increase in Confidence). "paper" stays available by name and is still
# what UnionCAMConfig() means.
DEFAULT_PRESET = "faithful"


@dataclass
class UnionCAMResult:
    """One batch's explanation; every tensor stays on the input's device."""

    maps: torch.Tensor  # N×H×W in [0,1]: the selected map of each image
    selected: torch.Tensor  # N int64: index into ``pool``
    scores: torch.Tensor  # N×P float32: the selection score of every pool member (β by default)
    pool: tuple[str, ...]  # P names
    classes: torch.Tensor  # N int64: the class explained
    probs: torch.Tensor  # N float32: p(x)_c
    baseline_probs: torch.Tensor  # N float32: p(x_b)_c
    beta: torch.Tensor | None = None  # N×P float32: β of every pool member (= scores for "beta")
    forwards: int = 0  # forward passes spent on the batch (gradient pass counted as one per image)
    components: dict[str, torch.Tensor] | None = None  # name -> N×H×W normalised
    components_raw: dict[str, torch.Tensor] | None = None  # name -> raw map before resizing

    def __len__(self) -> int:
        return self.maps.shape[0]

    @property
    def selected_names(self) -> list[str]:
        return [self.pool[i] for i in self.selected.tolist()]

    def to(self, device: torch.device | str) -> UnionCAMResult:
        """A copy with every tensor moved (e.g. to the CPU for writing)."""
        def mv(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, dict):
                return {k: t.to(device) for k, t in v.items()}
            return v

        return UnionCAMResult(**{f.name: mv(getattr(self, f.name)) for f in dataclasses.fields(self)})


class UnionCAM(BaseCAM):
    """UnionCAM over batches: ``with UnionCAM(model, "layer4") as cam: res = cam(x)``.

    Args:
        model: a classifier returning logits; it is not modified.
        target_layer: dotted name, module, or None (automatic); see :class:`BaseCAM`.
        config: a :class:`UnionCAMConfig` or a preset name; ``None`` means
            :data:`DEFAULT_PRESET` (``"faithful"``; the paper's configuration is
            ``config="paper"``). Keyword arguments override its fields
            (``UnionCAM(m, theta=20)``).
    """

    def __init__(self, model, target_layer=None, config: UnionCAMConfig | str | None = None,
                 **overrides: Any) -> None:
        if config is None:
            config = PRESETS[DEFAULT_PRESET]
        elif isinstance(config, str):
            config = UnionCAMConfig.preset(config)
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        super().__init__(model, target_layer, chunk_size=config.chunk_size,
                         channels_last=config.channels_last, autocast=config.autocast)

    @property
    def pool(self) -> tuple[str, ...]:
        return self.config.pool

    def baseline_probs(self, x: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, int]:
        """p(x_b)_c and the forwards it took: one for the whole batch with zeros."""
        if self.config.baseline == "zeros":
            return self.class_probs(torch.zeros_like(x[:1]))[0, classes], 1
        blurred = gaussian_blur(x)
        return self.probs_of(blurred, classes), x.shape[0]

    def confidence_gain(self, x: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor,
                        baseline: torch.Tensor) -> torch.Tensor:
        """β of M maps per image (N×M×H×W → N×M), all masked forwards batched together."""
        n, m = maps.shape[:2]
        flat = maps.flatten(0, 1)
        probs = self.masked_probs(n * m, lambda j: x[j // m] * flat[j][:, None],
                                  classes.repeat_interleave(m), x.device)
        return probs.view(n, m) - baseline[:, None]

    def __call__(self, x: torch.Tensor, targets=None) -> UnionCAMResult:
        cfg = self.config
        validate_inputs(x, targets)
        x = x.float() if x.dtype != torch.float32 else x
        need_grad = bool(cfg.gradient) or "groupcam" in cfg.region
        fwd = self.gradient_pass(x, targets, need_grad=need_grad)
        size = (x.shape[-2], x.shape[-1])
        classes, n = fwd.classes, x.shape[0]
        forwards = n

        comp: dict[str, torch.Tensor] = {}
        raw: dict[str, torch.Tensor] = {}
        for g in cfg.gradient:
            r = gradient_map(g, fwd.activation, fwd.gradient, cfg.theta)
            raw[f"gradient:{g}"] = r
            comp[f"gradient:{g}"] = minmax(upsample(r, size))
        for name in cfg.region:
            if name == "scorecam":
                out = score_cam(self, x, fwd.activation, classes)
            else:
                out = group_cam(self, x, fwd.activation, fwd.gradient, classes, cfg.groups)
            raw[f"region:{name}"] = out.raw
            comp[f"region:{name}"] = out.maps
            forwards += out.forwards

        base, spent = self.baseline_probs(x, classes)
        forwards += spent
        names = list(comp)
        beta_c = self.confidence_gain(x, torch.stack([comp[k] for k in names], 1), classes, base)
        forwards += n * len(names)
        beta = {k: beta_c[:, i] for i, k in enumerate(names)}

        fused_names = [f"fused:{g}+{r}" for g in cfg.gradient for r in cfg.region]
        if fused_names:
            fused = []
            for g in cfg.gradient:
                for r in cfg.region:
                    bg, br = beta[f"gradient:{g}"], beta[f"region:{r}"]
                    fused.append(minmax(bg[:, None, None] * comp[f"gradient:{g}"]
                                        + br[:, None, None] * comp[f"region:{r}"]))
            fused_t = torch.stack(fused, 1)
            beta_f = self.confidence_gain(x, fused_t, classes, base)
            forwards += n * len(fused_names)
            for i, k in enumerate(fused_names):
                comp[k], beta[k] = fused_t[:, i], beta_f[:, i]

        pool = cfg.pool
        beta_pool = torch.stack([beta[k] for k in pool], 1)
        stacked = torch.stack([comp[k] for k in pool], 1)
        scores, spent = SELECTIONS[cfg.selection](self, x, stacked, classes, beta_pool)
        forwards += spent
        selected = scores.argmax(1)  # first maximum: earlier members win ties
        maps = stacked.gather(1, selected[:, None, None, None].expand(n, 1, *size))[:, 0]
        return UnionCAMResult(
            maps=maps, selected=selected, scores=scores, pool=pool, classes=classes,
            probs=fwd.probs, baseline_probs=base, beta=beta_pool, forwards=forwards,
            components=comp if cfg.return_components else None,
            components_raw=raw if cfg.return_components else None,
        )
