"""The randomisation sanity check in a report: does each method's map change when the
model's blocks are re-initialised from the top (Adebayo et al., NeurIPS 2018)?

The check itself is :func:`unioncam.sanity.cascading_randomization`; this module only says
which CAM each report method is, runs the cascade on a few images and keeps the mean curves
(a few numbers per step, so a report's JSON stays small). The cascade stops
:data:`PAST_LAYER` steps after the step that changes the target layer's output: the
verdict is read there, and the deeper steps would cost as much again without changing it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["PAST_LAYER", "SanitySpec", "report_specs", "run_sanity", "store_specs"]

#: Steps run past the one that changes the target layer (the curve shows the fall continue).
PAST_LAYER = 2

@dataclasses.dataclass(frozen=True)
class SanitySpec:
    """How to build one report method's CAM: a registered method name, its keyword
    arguments, and (for UnionCAM's components) which component map to read."""

    method: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    component: str | None = None


def report_specs(methods: Sequence[str], *, groups: int = 32,
                 chunk_size: int | None = None) -> dict[str, SanitySpec]:
    """Specs for ``unioncam report --images`` method names (:mod:`unioncam.names`): a
    registered method is itself, ``unioncam[:<preset>]`` UnionCAM with that preset, and a
    fused member ``fused:<gradient>+<region>`` the component of the one-pair UnionCAM that
    makes it (``fused:denoised+scorecam``: the paper's configuration's L_fused)."""
    from unioncam.names import method_config, split_fused
    from unioncam.union import UnionCAMConfig

    speed = {"chunk_size": chunk_size} if chunk_size else {}
    out: dict[str, SanitySpec] = {}
    for m in methods:
        preset = method_config(m)
        pair = split_fused(m)
        if preset is not None:
            out[m] = SanitySpec("unioncam", {"config": dataclasses.replace(preset, **speed)})
        elif pair is not None:
            cfg = UnionCAMConfig(gradient=(pair[0],), region=(pair[1],), groups=groups,
                                 include_gradient_maps=False, selection="beta",
                                 return_components=True, **speed)  # fmt: skip
            out[m] = SanitySpec("unioncam", {"config": cfg}, m)
        else:
            kw: dict[str, Any] = dict(speed)
            if m == "groupcam":
                kw["groups"] = groups
            out[m] = SanitySpec(m, kw)
    return out


def store_specs(methods: Sequence[str], config: Any) -> dict[str, SanitySpec]:
    """Specs for the methods of a pipeline run, with the run's own settings
    (``config``: its :class:`pipeline.config.RunConfig`)."""
    return {m: (SanitySpec("unioncam", {"config": config.preset}) if m == "unioncam"
                else SanitySpec(m, config.method_kwargs(m)))
            for m in methods}  # fmt: skip


def run_sanity(
    model: nn.Module,
    x: torch.Tensor,
    layer: str,
    specs: Mapping[str, SanitySpec],
    targets: Sequence[int] | torch.Tensor | None = None,
    *,
    past_layer: int = PAST_LAYER,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, dict[str, Any]]:
    """Per method: the steps, mean Spearman and SSIM per step, the layer's step and the
    verdict (:attr:`unioncam.sanity.SanityResult.passes`)."""
    from unioncam.sanity import PASS_THRESHOLD, cascading_randomization

    out: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        if progress:
            progress(f"sanity check: {name} on {x.shape[0]} image(s)")
        r = cascading_randomization(
            model, x, spec.method, layer, targets=targets, seed=seed, past_layer=past_layer,
            component=spec.component, **dict(spec.kwargs),
        )  # fmt: skip
        k = r.layer_step
        out[name] = {
            "n": int(x.shape[0]),
            "steps": r.steps,
            "layer_step": k,
            "spearman": [round(float(v), 4) for v in r.spearman.mean(0)],
            "ssim": [round(float(v), 4) for v in r.ssim.mean(0)],
            "spearman_at_layer": float(r.spearman[:, k].mean()),
            "ssim_at_layer": float(r.ssim[:, k].mean()),
            "threshold": PASS_THRESHOLD,
            "passes": bool(r.passes),
        }
    return out
