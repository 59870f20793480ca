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
* ``hirescam`` — L = ReLU(Σ_k G_k ⊙ A_k)  (Draelos & Carin 2020).
* ``gradcam-elementwise`` — L = ReLU(Σ_k ReLU(G_k ⊙ A_k))  (pytorch-grad-cam's variant).
* ``eigencam`` — L = ReLU(X v₁) with X the h·w×K activation centred per channel and v₁ its
  first right singular vector (Muhammad & Yeasin 2020); needs no gradient.
* ``eigengradcam`` — the same projection of G ⊙ A.

The two Eigen methods share :func:`eigen_projection`, one batched ``torch.linalg.svd`` on
the device. An SVD fixes v₁ only up to its sign, and LAPACK's choice is arbitrary: on the
test photos numpy (pytorch-grad-cam's ``get_2d_projection``) and torch's CPU SVD disagreed
on 1 map in 8, and a GPU solver may disagree again. The projection is therefore flipped
when |min| > |max| (pytorch-grad-cam's own sign correction,
``get_2d_projection_with_sign_correction``, Eq. 13 of Seg-Eigen-CAM), so a map is the same
on every device and its salient side is the positive one that the ReLU keeps.

FinerCAM (Zhang et al. 2025) is Grad-CAM's weighting of a different score: the target
logit contrasted with its nearest classes, see :func:`finer_score`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unioncam.cam import BaseCAM, CAMResult, Score
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
    "HiResCAM",
    "GradCAMElementWise",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "eigen_projection",
    "finer_score",
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


def _hirescam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g * a).sum(1).clamp_min(0)


def _gradcam_elementwise(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g * a).clamp_min(0).sum(1)


def eigen_projection(maps: torch.Tensor) -> torch.Tensor:
    """Each N×K×h×w map projected on its first principal component: N×h×w, sign-corrected.

    As pytorch-grad-cam's ``get_2d_projection``: NaN set to 0, the h·w×K matrix centred
    per channel, projected on the first right singular vector; then flipped where
    |min| > |max| (see the module docstring). One batched SVD, no host sync.
    """
    n, _, h, w = maps.shape
    m = torch.where(torch.isnan(maps), torch.zeros_like(maps), maps)
    x = m.flatten(2).transpose(1, 2)  # N×hw×K
    x = x - x.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    p = (x @ vh[:, 0, :, None])[..., 0]
    flip = p.amin(1).abs() > p.amax(1).abs()
    return torch.where(flip[:, None], -p, p).view(n, h, w)


def _eigencam(a: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    return eigen_projection(a).clamp_min(0)


def _eigengradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return eigen_projection(g * a).clamp_min(0)


GRADIENT_METHODS.add("hirescam", _hirescam)
GRADIENT_METHODS.add("gradcam-elementwise", _gradcam_elementwise)
GRADIENT_METHODS.add("eigencam", _eigencam, needs_gradient=False)
GRADIENT_METHODS.add("eigengradcam", _eigengradcam)


def finer_score(alpha: float = 1.0, comparisons: tuple[int, ...] = (1, 2, 3)) -> Score:
    """FinerCAM's score: Σ_j p_j (z_c − α z_j) / (Σ_j p_j + 1e-9) over the nearest classes.

    The classes j are those at ranks ``comparisons`` when all classes are sorted by
    |z_j − z_c| (rank 0 is c itself), p = softmax(z) (differentiated too), exactly as
    pytorch-grad-cam's ``FinerWeightedTarget`` with its default comparison ranks 1, 2, 3.
    """
    def score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ranks = [r for r in comparisons if r < logits.shape[1]]
        zc = logits.gather(1, target[:, None])
        order = (logits.detach() - zc.detach()).abs().argsort(1)
        near = order[:, ranks]
        w = logits.softmax(1).gather(1, near)
        num = (w * (zc - alpha * logits.gather(1, near))).sum(1)
        return num / (w.sum(1) + 1e-9)

    return score


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
        self.needs_gradient = GRADIENT_METHODS.info(self.method).get("needs_gradient", True)

    #: What the backward differentiates (``None``: the target logit).
    score: Score | None = None

    def explain(self, x: torch.Tensor, targets) -> CAMResult:
        fwd = self.gradient_pass(x, targets, need_grad=self.needs_gradient, score=self.score)
        raw = gradient_map(self.method, fwd.activation, fwd.gradient, self.theta)
        return CAMResult(maps=minmax(upsample(raw, x.shape[-2:])), target=fwd.target,
                         prob=fwd.prob, forwards=x.shape[0], raw=raw)


@METHODS.register("gradcam", label="Grad-CAM")
class GradCAM(GradientCAM):
    """Grad-CAM: ReLU(Σ_k mean(G_k) A_k)."""

    method = "gradcam"


@METHODS.register("gradcam++", label="Grad-CAM++")
class GradCAMPlusPlus(GradientCAM):
    """Grad-CAM++: ReLU(Σ_k Σ_ij α_kij ReLU(G_kij) A_k), α = G²/(2G² + ΣA·G³)."""

    method = "gradcam++"


@METHODS.register("xgradcam", label="XGrad-CAM")
class XGradCAM(GradientCAM):
    """XGrad-CAM: ReLU(Σ_k (Σ G_k A_k / Σ A_k) A_k)."""

    method = "xgradcam"


@METHODS.register("layercam", label="Layer-CAM")
class LayerCAM(GradientCAM):
    """Layer-CAM: ReLU(Σ_k ReLU(G_k) ⊙ A_k)."""

    method = "layercam"


@METHODS.register("denoised", label="Denoised (L_den)")
class DenoisedCAM(GradientCAM):
    """UnionCAM's denoising module alone: Σ_k (P_k / ΣP_k) ⊙ A_k with thresholded gradients."""

    method = "denoised"


@METHODS.register("hirescam", label="HiResCAM")
class HiResCAM(GradientCAM):
    """HiResCAM: ReLU(Σ_k G_k ⊙ A_k), the element-wise product before the channel sum."""

    method = "hirescam"


@METHODS.register("gradcam-elementwise", label="Grad-CAM element-wise")
class GradCAMElementWise(GradientCAM):
    """Grad-CAM element-wise: ReLU(Σ_k ReLU(G_k ⊙ A_k))."""

    method = "gradcam-elementwise"


@METHODS.register("eigencam", label="EigenCAM")
class EigenCAM(GradientCAM):
    """EigenCAM: the activation's first principal component (one forward, no backward)."""

    method = "eigencam"


@METHODS.register("eigengradcam", label="EigenGradCAM")
class EigenGradCAM(GradientCAM):
    """EigenGradCAM: the first principal component of G ⊙ A."""

    method = "eigengradcam"


@METHODS.register("finercam", label="FinerCAM")
class FinerCAM(GradientCAM):
    """FinerCAM: Grad-CAM of the target logit contrasted with its nearest classes.

    ``alpha`` weighs the contrast (pytorch-grad-cam's default 1); ``comparisons`` are the
    ranks of the contrasted classes by logit distance (default 1, 2, 3). Same cost as
    Grad-CAM: one forward and one backward per image.
    """

    method = "gradcam"

    def __init__(self, model, layer=None, *, alpha: float = 1.0,
                 comparisons: tuple[int, ...] = (1, 2, 3), **kwargs) -> None:
        super().__init__(model, layer, **kwargs)
        if not comparisons or any(isinstance(r, bool) or not isinstance(r, int) or r < 1
                                  for r in comparisons):
            raise ValueError(f"comparisons must be ranks >= 1, got {comparisons!r}")
        self.alpha = float(alpha)
        self.comparisons = tuple(comparisons)
        self.score = finer_score(self.alpha, self.comparisons)
