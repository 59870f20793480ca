"""Gradient-weighted CAMs and UnionCAM's denoising module.

All maps are computed from the hooked activation ``A`` (N×K×h×w) and its gradient
``G = ∂logit_c/∂A`` from one backward pass, at the layer's resolution, then upsampled
bilinearly to the input size and min–max normalised. The *raw* low-resolution maps are
kept in the result too, since that is where other libraries' maps can be compared before
their own resizing.

Weightings (registered in :data:`GRADIENT_METHODS` by name):

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

from collections.abc import Callable

import torch

from unioncam.cam import BaseCAM, CAMResult
from unioncam.ops import minmax, percentile, upsample
from unioncam.registry import METHODS, Registry

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

Weighting = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: name -> fn(activation, gradient) -> raw map N×h×w (``denoised`` also takes ``theta``).
GRADIENT_METHODS: Registry[Callable[..., torch.Tensor]] = Registry("gradient method")


def denoise_gradient(grad: torch.Tensor, theta: float = 10.0) -> torch.Tensor:
    """Zero every gradient below its channel's θ-th percentile (linear interpolation)."""
    flat = grad.flatten(-2)
    tau = percentile(flat, theta)[..., None]
    return torch.where(flat >= tau, flat, torch.zeros_like(flat)).view_as(grad)


@GRADIENT_METHODS.register("denoised", theta=True)
def _denoised(a: torch.Tensor, g: torch.Tensor, theta: float = 10.0) -> torch.Tensor:
    p = denoise_gradient(g, theta).clamp_min(0)
    w = p / (p.sum((-2, -1), keepdim=True) + 1e-8)
    return (w * a).sum(1)


def _gradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    w = g.mean((-2, -1), keepdim=True)
    return (w * a).sum(1).clamp_min(0)


def _gradcampp(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    g2, g3 = g.pow(2), g.pow(3)
    sum_a = a.sum((-2, -1), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)  # pytorch-grad-cam's eps, for parity
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    w = (alpha * g.clamp_min(0)).sum((-2, -1), keepdim=True)
    return (w * a).sum(1).clamp_min(0)


def _xgradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    w = (g * a).sum((-2, -1), keepdim=True) / (a.sum((-2, -1), keepdim=True) + 1e-7)
    return (w * a).sum(1).clamp_min(0)


def _layercam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g.clamp_min(0) * a).sum(1).clamp_min(0)


def _with_denoising(fn: Weighting) -> Callable[..., torch.Tensor]:
    def denoised(a: torch.Tensor, g: torch.Tensor, theta: float = 10.0) -> torch.Tensor:
        return fn(a, denoise_gradient(g, theta))

    return denoised


_WEIGHTINGS = {"gradcam": _gradcam, "gradcam++": _gradcampp, "xgradcam": _xgradcam,
               "layercam": _layercam}
for _name, _fn in _WEIGHTINGS.items():
    GRADIENT_METHODS.add(_name, _fn)
for _name, _fn in _WEIGHTINGS.items():
    GRADIENT_METHODS.add(f"denoised-{_name}", _with_denoising(_fn), theta=True)


def gradient_map(method: str, activation: torch.Tensor, gradient: torch.Tensor,
                 theta: float = 10.0) -> torch.Tensor:
    """The raw low-resolution map (N×h×w) of one gradient method, before resizing."""
    fn = GRADIENT_METHODS[method]
    if GRADIENT_METHODS.info(method).get("theta"):
        return fn(activation, gradient, theta)
    return fn(activation, gradient)


class GradientCAM(BaseCAM):
    """Any gradient method above, alone: ``with GradCAM(model) as cam: res = cam(x)``.

    ``res.maps`` are N×H×W in [0, 1] at the input size, ``res.raw`` the low-resolution maps.
    One forward and one backward per image; never tuned (it runs no masked forwards).
    """

    method = "gradcam"
    runs_masked_forwards = False

    def __init__(self, model, layer=None, *, method: str | None = None, theta: float = 10.0,
                 **kwargs) -> None:
        super().__init__(model, layer, **kwargs)
        self.method = GRADIENT_METHODS.check(method or self.method)
        self.theta = theta

    def explain(self, x: torch.Tensor, targets) -> CAMResult:
        fwd = self.gradient_pass(x, targets)
        raw = gradient_map(self.method, fwd.activation, fwd.gradient, self.theta)
        return CAMResult(maps=minmax(upsample(raw, x.shape[-2:])), target=fwd.target,
                         prob=fwd.prob, forwards=x.shape[0], raw=raw)


@METHODS.register("gradcam")
class GradCAM(GradientCAM):
    """Grad-CAM: ReLU(Σ_k mean(G_k) A_k)."""

    method = "gradcam"


@METHODS.register("gradcam++")
class GradCAMPlusPlus(GradientCAM):
    """Grad-CAM++: ReLU(Σ_k Σ_ij α_kij ReLU(G_kij) A_k), α = G²/(2G² + ΣA·G³)."""

    method = "gradcam++"


@METHODS.register("xgradcam")
class XGradCAM(GradientCAM):
    """XGrad-CAM: ReLU(Σ_k (Σ G_k A_k / Σ A_k) A_k)."""

    method = "xgradcam"


@METHODS.register("layercam")
class LayerCAM(GradientCAM):
    """Layer-CAM: ReLU(Σ_k ReLU(G_k) ⊙ A_k)."""

    method = "layercam"


@METHODS.register("denoised")
class DenoisedCAM(GradientCAM):
    """UnionCAM's denoising module alone: Σ_k (P_k / ΣP_k) ⊙ A_k with thresholded gradients."""

    method = "denoised"
