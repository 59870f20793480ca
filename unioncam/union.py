"""UnionCAM: denoise, fuse by confidence gain, select the best map of the pool.

With a target class c, a baseline input x_b (zeros of the normalised space by
default) and p(·) = softmax(f(·))_c:

1. Denoising module — ``L_den``: see :mod:`unioncam.gradient` (``denoised``).
2. Region module — ``L_reg``: Score-CAM, see :mod:`unioncam.region`.
3. Confidence gain — β(L) = p(x ⊙ L) − p(x_b).
4. Union — L_fused = minmax(β(L_den)·L_den + β(L_reg)·L_reg).
5. Selection — pool {L_reg, L_fused}; keep the member with the highest β
   (ties go to the earlier member, so L_fused only when strictly greater).

That is the ``paper`` preset, exactly. Generalised without losing that case: ``gradient``
and ``region`` are lists; the pool is every region map, then every fused (gradient,
region) pair, then — only with ``include_gradient_maps`` — the gradient maps themselves;
and the selection rule is any of :data:`unioncam.selection.SELECTION_RULES`.

All masked forwards (region masks, then the β of every component, then the β of every
fused map, then the selection rule's probes) go through the engine's chunk queue; the
baseline forward runs once per batch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from unioncam.cam import BaseCAM, CAMResult, Forward
from unioncam.engine import check_autocast
from unioncam.gradient import GRADIENT_METHODS, gradient_map
from unioncam.ops import gaussian_blur, minmax, upsample
from unioncam.region import REGION_METHODS
from unioncam.registry import METHODS
from unioncam.selection import SELECTION_RULES, rule_forwards

__all__ = ["UnionCAMConfig", "UnionCAM", "PoolMaps", "PRESETS", "DEFAULT_PRESET", "BASELINES"]

BASELINES = ("zeros", "blur")

#: The preset used whenever none is named: by ``UnionCAM(model)``, ``UnionCAMConfig()``, the
#: pipeline's ``RunConfig`` and ``unioncam run``. "faithful" met the pre-registered decision
#: rule of benchmarks/results/faithfulness_protocol.md on the report half (EfficientNet-Lite0,
#: _blocks.15, n = 20: insertion − deletion +0.047 [+0.025, +0.073] over Grad-CAM, the best
#: component; no loss on swapped-baseline RISE, Average Drop or Increase in Confidence).
#: The paper's method stays one argument away: ``config="paper"``.
DEFAULT_PRESET = "faithful"

# Settings that change results (the fingerprint); the rest only change speed or output size.
_RESULT_FIELDS = ("gradient", "region", "theta", "baseline", "groups", "include_gradient_maps",
                  "selection", "autocast")


@dataclass(frozen=True)
class UnionCAMConfig:
    """Every setting of the method; the field defaults are :data:`DEFAULT_PRESET`'s.

    Settings that change results are part of :meth:`fingerprint`; speed-only settings
    (``chunk_size``, ``channels_last``) and ``return_components`` are not. A config has no
    stored name: :attr:`preset_name` says which preset it equals, if any, so a preset with
    overrides never calls itself by the preset's name.
    """

    # The default preset, "faithful": a 7-member pool — Group-CAM, the denoised, Grad-CAM and
    # Grad-CAM++ maps, and each fused with Group-CAM — kept by an 8-step insertion − deletion
    # proxy instead of β (which rewards broad maps). 143 forwards per image whatever the
    # layer's width.
    gradient: tuple[str, ...] = ("denoised", "gradcam", "gradcam++")
    region: tuple[str, ...] = ("groupcam",)
    theta: float = 10.0
    baseline: str = "zeros"
    groups: int = 32
    include_gradient_maps: bool = True
    selection: str = "insdel-8"
    autocast: str | None = None
    chunk_size: int | None = None
    channels_last: bool | None = None
    return_components: bool = False

    def __post_init__(self) -> None:
        for attr in ("gradient", "region"):
            value = getattr(self, attr)
            if isinstance(value, str):
                object.__setattr__(self, attr, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, attr, tuple(value))
        for g in self.gradient:
            GRADIENT_METHODS.check(g)
        for r in self.region:
            REGION_METHODS.check(r)
        if not self.region:
            raise ValueError("region: at least one region method is needed (the pool's first member)")
        if not 0.0 <= float(self.theta) <= 100.0:
            raise ValueError(f"theta must be a percentile in [0, 100], got {self.theta}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be a positive int, got {self.groups!r}")
        check_autocast(self.autocast)
        SELECTION_RULES.check(self.selection)
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UnionCAMConfig:
        """A named configuration (see :data:`PRESETS`), optionally with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @property
    def preset_name(self) -> str | None:
        """The preset whose result settings this config has, or ``None`` (a custom config)."""
        mine = self.fingerprint()
        return next((n for n, p in PRESETS.items() if p.fingerprint() == mine), None)

    def describe(self) -> str:
        """``faithful``, or ``custom`` with the settings that differ from the closest preset."""
        if self.preset_name:
            return self.preset_name
        mine = self.result_settings()
        diffs = {n: {k: v for k, v in mine.items() if p.result_settings()[k] != v}
                 for n, p in PRESETS.items()}
        base = min(diffs, key=lambda n: len(diffs[n]))
        return f"custom ({base} with " + ", ".join(f"{k}={v}" for k, v in diffs[base].items()) + ")"

    @property
    def pool(self) -> tuple[str, ...]:
        """Names of the pool members, in selection order (the one place they are built)."""
        names = [f"region:{r}" for r in self.region]
        names += [f"fused:{g}+{r}" for g in self.gradient for r in self.region]
        if self.include_gradient_maps:
            names += [f"gradient:{g}" for g in self.gradient]
        return tuple(names)

    def forwards_per_image(self, channels: int | None = None) -> int:
        """Forward passes per image at a batch of one (Score-CAM: pass the layer's ``channels``).

        Score-CAM skips constant channels, so for it this is an upper bound.
        """
        n = 1  # the gradient pass
        for r in self.region:
            if r == "scorecam":
                if channels is None:
                    raise ValueError("forwards_per_image: Score-CAM costs one forward per channel; "
                                     "pass channels=")
                n += channels
            else:
                n += self.groups + 1
        components = len(self.region) + len(self.gradient)
        n += components + len(self.gradient) * len(self.region)  # β of components and fused
        n += 1  # the baseline (zeros: one forward per batch, counted here at a batch of one)
        return n + rule_forwards(self.selection, 1, len(self.pool))

    def result_settings(self) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in _RESULT_FIELDS}

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
        return json.dumps(self.result_settings(), sort_keys=True)


PRESETS: dict[str, UnionCAMConfig] = {
    # The default (the field defaults above).
    "faithful": UnionCAMConfig(),
    # The paper's UnionCAM exactly: denoised + Score-CAM, selected by β.
    "paper": UnionCAMConfig(gradient=("denoised",), region=("scorecam",),
                            include_gradient_maps=False, selection="beta"),
    # Group-CAM instead of Score-CAM as the region side: 32 masked forwards per image instead
    # of one per channel, for whole-dataset runs on a budget.
    "fast": UnionCAMConfig(gradient=("denoised",), region=("groupcam",),
                           include_gradient_maps=False, selection="beta"),
    # The default's pool, kept by the drop of p_c when its top 20 % of pixels are removed:
    # one forward per member, 50 forwards per image.
    "faithful-fast": UnionCAMConfig(selection="drop-20"),
}


class PoolMaps(NamedTuple):
    """Steps 1–4 of one batch: the components, the fused maps and their β."""

    fwd: Forward  # the gradient pass
    maps: dict[str, torch.Tensor]  # member name -> N×H×W, normalised
    raw: dict[str, torch.Tensor]  # component name -> its map before resizing
    beta: dict[str, torch.Tensor]  # member name -> N, β = p(x ⊙ L) − p(x_b)
    baseline_prob: torch.Tensor  # N: p(x_b)
    forwards: int  # spent so far


@METHODS.register("unioncam", label="UnionCAM")
class UnionCAM(BaseCAM):
    """UnionCAM over batches: ``with UnionCAM(model, "layer4") as cam: res = cam(x)``.

    Args:
        model: a classifier returning logits; it is not modified.
        layer: dotted name, module, or None (automatic); see :class:`~unioncam.cam.BaseCAM`.
        config: a :class:`UnionCAMConfig` or a preset name; ``None`` means
            :data:`DEFAULT_PRESET`. Keyword arguments override its fields
            (``UnionCAM(m, config="paper", theta=20)``).
        reshape: the layer output's reshape step (a callable; ``None``: automatic); see
            :class:`~unioncam.cam.BaseCAM`. Not a config field: it changes no number for a
            model whose layer is already N×K×h×w, and a callable has no stable fingerprint.
    """

    def __init__(self, model, layer=None, config: UnionCAMConfig | str | None = None, *,
                 reshape=None, **overrides: Any) -> None:
        if config is None:
            config = PRESETS[DEFAULT_PRESET]
        elif isinstance(config, str):
            config = UnionCAMConfig.preset(config)
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        super().__init__(model, layer, reshape=reshape, chunk_size=config.chunk_size,
                         channels_last=config.channels_last, autocast=config.autocast)
        self.needs_gradient = bool(config.gradient) or any(
            REGION_METHODS.info(r)["needs_gradient"] for r in config.region)

    @property
    def pool(self) -> tuple[str, ...]:
        return self.config.pool

    def baseline_prob(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        """p(x_b)_target and the forwards it took: one for the whole batch with zeros."""
        if self.config.baseline == "zeros":
            return self.softmax(torch.zeros_like(x[:1]))[0, target], 1
        return self.probs_of(gaussian_blur(x), target), x.shape[0]

    def confidence_gain(self, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                        baseline: torch.Tensor) -> torch.Tensor:
        """β of M maps per image (N×M×H×W → N×M), all masked forwards batched together."""
        n, m = maps.shape[:2]
        flat = maps.flatten(0, 1)
        probs = self.probs(n * m, lambda j: x[j // m] * flat[j][:, None],
                           target.repeat_interleave(m), x.device)
        return probs.view(n, m) - baseline[:, None]

    def pool_maps(self, x: torch.Tensor, targets) -> PoolMaps:
        """Steps 1–4: every component and fused map with its β (what the selection ranks,
        and what Fusion-CAM fuses)."""
        cfg = self.config
        fwd = self.gradient_pass(x, targets, need_grad=self.needs_gradient)
        size = (x.shape[-2], x.shape[-1])
        target, n = fwd.target, x.shape[0]
        forwards = n

        comp: dict[str, torch.Tensor] = {}
        raw: dict[str, torch.Tensor] = {}
        for g in cfg.gradient:
            r = gradient_map(g, fwd.activation, fwd.gradient, cfg.theta)
            raw[f"gradient:{g}"] = r
            comp[f"gradient:{g}"] = minmax(upsample(r, size))
        for name in cfg.region:
            out = REGION_METHODS[name](self, x, fwd, groups=cfg.groups)
            raw[f"region:{name}"] = out.raw
            comp[f"region:{name}"] = out.maps
            forwards += out.forwards

        base, spent = self.baseline_prob(x, target)
        forwards += spent
        names = list(comp)
        beta_c = self.confidence_gain(x, torch.stack([comp[k] for k in names], 1), target, base)
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
            beta_f = self.confidence_gain(x, fused_t, target, base)
            forwards += n * len(fused_names)
            for i, k in enumerate(fused_names):
                comp[k], beta[k] = fused_t[:, i], beta_f[:, i]

        return PoolMaps(fwd, comp, raw, beta, base, forwards)

    def explain(self, x: torch.Tensor, targets) -> CAMResult:
        return self.select(x, self.pool_maps(x, targets))

    def select(self, x: torch.Tensor, pool_maps: PoolMaps) -> CAMResult:
        """Step 5: this config's selection over its pool, read from ``pool_maps``.

        ``pool_maps`` may come from a config with more members (more gradient or region
        methods, the same ``theta``/``baseline``/``groups``): a comparison of several
        presets computes the shared pool once and lets each preset select from it here,
        with the library's rule, instead of re-writing the rule outside.
        """
        cfg = self.config
        fwd, comp, raw, beta, base, forwards = pool_maps
        size, target, n = (x.shape[-2], x.shape[-1]), fwd.target, x.shape[0]
        pool = cfg.pool
        beta_pool = torch.stack([beta[k] for k in pool], 1)
        stacked = torch.stack([comp[k] for k in pool], 1)
        score, spent = SELECTION_RULES[cfg.selection](self, x, stacked, target, beta_pool)
        forwards += spent
        selected = score.argmax(1)  # first maximum: earlier members win ties
        maps = stacked.gather(1, selected[:, None, None, None].expand(n, 1, *size))[:, 0]
        return CAMResult(
            maps=maps, target=target, prob=fwd.prob, forwards=forwards, pool=pool,
            selected=selected, beta=beta_pool, selection_score=score, baseline_prob=base,
            components=comp if cfg.return_components else None,
            components_raw=raw if cfg.return_components else None,
        )
