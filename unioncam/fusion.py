"""Fusion-CAM: UnionCAM's pool, fused by similarity instead of selected.

Fusion-CAM (arXiv 2603.05386, 2026) shares UnionCAM's steps 1–4 — the denoised Grad-CAM
L_den and a region map L_reg (Score-CAM), their confidence gains β, and the fused map
L_fused = minmax(β_den L_den + β_reg L_reg) with its own β_fused — and replaces step 5,
the choice between L_reg and L_fused, by a pixel-wise fusion of the two:

    L₁ = β_fused · L_fused,   L₂ = β_reg · L_reg,   s = clamp(1 − |L₁ − L₂|, 0, 1),
    L  = minmax(s · max(L₁, L₂) + (1 − s) · (L₁ + L₂) / 2).

Where the two maps agree the stronger value is kept, where they disagree their mean. So
it is a final step on :meth:`UnionCAM.pool_maps` (not a selection rule: a rule picks one
member, this builds a new map) and costs exactly what UnionCAM's ``paper`` configuration
costs: 1 + K + 3 forwards per image for a K-channel layer, plus one baseline per batch.
Any one gradient and one region method can be paired (``region=("groupcam",)`` gives a
fast variant), the pool's other settings as in :class:`UnionCAMConfig`.
"""

from __future__ import annotations

import torch

from unioncam.cam import CAMResult
from unioncam.ops import minmax
from unioncam.registry import METHODS
from unioncam.union import UnionCAM, UnionCAMConfig

__all__ = ["FusionCAM", "similarity_fusion"]


def similarity_fusion(fused: torch.Tensor, region: torch.Tensor, beta_fused: torch.Tensor,
                      beta_region: torch.Tensor) -> torch.Tensor:
    """Fusion-CAM's last step for N maps of each kind (N×H×W, β of shape N)."""
    a = beta_fused[:, None, None] * fused
    b = beta_region[:, None, None] * region
    sim = (1.0 - (a - b).abs()).clamp(0.0, 1.0)
    return minmax(sim * torch.maximum(a, b) + (1.0 - sim) * 0.5 * (a + b))


@METHODS.register("fusioncam", label="Fusion-CAM")
class FusionCAM(UnionCAM):
    """Fusion-CAM over batches: ``with FusionCAM(model, "_blocks.15") as cam: res = cam(x)``.

    ``config`` defaults to ``"paper"`` (denoised Grad-CAM with Score-CAM); it must pair one
    gradient method with one region method. ``res.pool`` and ``res.beta`` are the two maps
    fused and their β; ``res.selected`` is ``None`` (nothing is selected).
    """

    def __init__(self, model, layer=None, config: UnionCAMConfig | str | None = "paper", *,
                 reshape=None, **overrides) -> None:
        super().__init__(model, layer, config, reshape=reshape, **overrides)
        cfg = self.config
        if len(cfg.gradient) != 1 or len(cfg.region) != 1:
            raise ValueError("Fusion-CAM fuses one gradient map with one region map; got "
                             f"gradient={list(cfg.gradient)}, region={list(cfg.region)}")

    @property
    def pool(self) -> tuple[str, ...]:
        g, r = self.config.gradient[0], self.config.region[0]
        return (f"region:{r}", f"fused:{g}+{r}")

    def explain(self, x: torch.Tensor, targets) -> CAMResult:
        fwd, comp, raw, beta, base, forwards = self.pool_maps(x, targets)
        region, fused = self.pool
        maps = similarity_fusion(comp[fused], comp[region], beta[fused], beta[region])
        keep = self.config.return_components
        return CAMResult(
            maps=maps, target=fwd.target, prob=fwd.prob, forwards=forwards, pool=self.pool,
            beta=torch.stack([beta[region], beta[fused]], 1), baseline_prob=base,
            components=comp if keep else None, components_raw=raw if keep else None)
