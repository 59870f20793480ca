"""Gradient-weighted CAMs and UnionCAM's denoising module.

All maps are computed from the hooked activation ``A`` (N×K×h×w) and its
gradient ``G = ∂logit_c/∂A`` from one backward pass, at the layer's
resolution, then upsampled bilinearly to the input size and min–max
normalised. The *raw* low-resolution maps are public too, since that is where
other libraries' maps can be compared before their own resizing.

Methods (``name`` in the configs):

* ``denoised`` — UnionCAM's denoising module. Per channel,
  τ_k = θ-th percentile of G_k over its h·w positions; Ĝ_k = G_k·[G_k ≥ τ_k];
  P_k = max(Ĝ_k, 0); L = Σ_k (P_k / (Σ_ij P_k + 1e-8)) ⊙ A_k (pixel-wise, no ReLU).
* ``gradcam`` — w_k = mean_ij G_k; L = ReLU(Σ_k w_k A_k)  (Selvaraju et al. 2017).
* ``gradcam++`` — α = G² / (2G² + Σ_ij A_k · G³ + 1e-6), zero where G = 0;
  w_k = Σ_ij α ReLU(G_k); L = ReLU(Σ_k w_k A_k)  (Chattopadhay et al. 2018, in the
  exp-free form used by pytorch-grad-cam).
* ``xgradcam`` — w_k = Σ_ij G_k A_k / (Σ_ij A_k + 1e-7); L = ReLU(Σ_k w_k A_k)  (Fu et al. 2020).
* ``layercam`` — L = ReLU(Σ_k ReLU(G_k) ⊙ A_k)  (Jiang et al. 2021).
* ``denoised-<method>`` — the method above with G replaced by the thresholded Ĝ,
  i.e. the same denoising module in front of any weighting.
"""

from __future__ import annotations

import torch

from unioncam.base import BaseCAM
from unioncam.ops import minmax, percentile, upsample

__all__ = [
    "GRADIENT_METHODS",
    "denoise_gradient",
    "gradient_map",
    "GradientCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "DenoisedCAM",
]

_BASE_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam")
GRADIENT_METHODS = ("denoised", *_BASE_METHODS, *(f"denoised-{m}" for m in _BASE_METHODS))


def denoise_gradient(grad: torch.Tensor, theta: float = 10.0) -> torch.Tensor:
    """Zero every gradient below its channel's θ-th percentile (linear interpolation)."""
    flat = grad.flatten(-2)
    tau = percentile(flat, theta)[..., None]
    return torch.where(flat >= tau, flat, torch.zeros_like(flat)).view_as(grad)


def gradient_map(method: str, activation: torch.Tensor, gradient: torch.Tensor,
                 theta: float = 10.0) -> torch.Tensor:
    """The raw low-resolution map (N×h×w) of one gradient method, before resizing."""
    if method not in GRADIENT_METHODS:
        raise ValueError(f"unknown gradient method {method!r}; choose from {', '.join(GRADIENT_METHODS)}")
    a, g = activation, gradient
    if method == "denoised":
        p = denoise_gradient(g, theta).clamp_min(0)
        w = p / (p.sum((-2, -1), keepdim=True) + 1e-8)
        return (w * a).sum(1)
    if method.startswith("denoised-"):
        method, g = method.removeprefix("denoised-"), denoise_gradient(g, theta)
    if method == "gradcam":
        w = g.mean((-2, -1), keepdim=True)
        return (w * a).sum(1).clamp_min(0)
    if method == "gradcam++":
        g2, g3 = g.pow(2), g.pow(3)
        sum_a = a.sum((-2, -1), keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)  # pytorch-grad-cam's eps, for parity
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        w = (alpha * g.clamp_min(0)).sum((-2, -1), keepdim=True)
        return (w * a).sum(1).clamp_min(0)
    if method == "xgradcam":
        w = (g * a).sum((-2, -1), keepdim=True) / (a.sum((-2, -1), keepdim=True) + 1e-7)
        return (w * a).sum(1).clamp_min(0)
    # layercam
    return (g.clamp_min(0) * a).sum(1).clamp_min(0)


class GradientCAM(BaseCAM):
    """Any gradient method above, usable alone: ``with GradCAM(model) as cam: maps = cam(x)``.

    Returns N×H×W maps in [0, 1] at the input size. ``cam.last`` keeps the
    classes, probabilities and raw low-resolution maps of the last call.
    """

    method = "gradcam"

    def __init__(self, model, target_layer=None, *, method: str | None = None, theta: float = 10.0,
                 **kwargs) -> None:
        super().__init__(model, target_layer, **kwargs)
        self.method = method or self.method
        if self.method not in GRADIENT_METHODS:
            raise ValueError(f"unknown gradient method {self.method!r}")
        self.theta = theta
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, targets=None) -> torch.Tensor:
        from unioncam.base import validate_inputs

        validate_inputs(x, targets)
        fwd = self.gradient_pass(x, targets)
        raw = gradient_map(self.method, fwd.activation, fwd.gradient, self.theta)
        self.last = {"classes": fwd.classes, "probs": fwd.probs, "raw": raw}
        return minmax(upsample(raw, x.shape[-2:]))


class GradCAM(GradientCAM):
    """Grad-CAM: ReLU(Σ_k mean(G_k) A_k)."""

    method = "gradcam"


class GradCAMPlusPlus(GradientCAM):
    """Grad-CAM++: ReLU(Σ_k Σ_ij α_kij ReLU(G_kij) A_k), α = G²/(2G² + ΣA·G³)."""

    method = "gradcam++"


class XGradCAM(GradientCAM):
    """XGrad-CAM: ReLU(Σ_k (Σ G_k A_k / Σ A_k) A_k)."""

    method = "xgradcam"


class LayerCAM(GradientCAM):
    """Layer-CAM: ReLU(Σ_k ReLU(G_k) ⊙ A_k)."""

    method = "layercam"


class DenoisedCAM(GradientCAM):
    """UnionCAM's denoising module alone: Σ_k (P_k / ΣP_k) ⊙ A_k with thresholded gradients."""

    method = "denoised"
