"""Region-based CAMs: each channel (or group of channels) becomes a mask whose
masked forward pass scores it.

The cost of these methods is the masked forwards — K per image for Score-CAM
(up to 1280 at EfficientNet-Lite0's head). Everything else here exists to make
those forwards the *only* cost: masks are built per chunk on the device from
the low-resolution activation (never an N×K×H×W tensor), constant channels
are skipped before scheduling, the (image, channel) pairs of the whole batch
are flattened into one queue so every forward is a full chunk, and the final
map is Σ_k s_k·A_k at low resolution, upsampled once (bilinear resizing is
linear, so this equals Σ_k s_k·U_k).

* Score-CAM (Wang et al. 2020, as in its authors' code): U_k = bilinear upsample
  of A_k; M_k = minmax(U_k), channels with max = min skipped;
  s_k = softmax(f(x ⊙ M_k))_c; L = minmax(ReLU(Σ_k s_k U_k)).
* Group-CAM (Zhang et al. 2021): channels split into G contiguous groups
  (channel k → group ⌊kG/K⌋); M_g = minmax(upsample(ReLU(Σ_{k∈g} w_k A_k))),
  w_k = mean G_k; x'_g = x ⊙ M_g + blur(x) ⊙ (1 − M_g);
  s_g = ReLU(softmax(f(x'_g))_c − softmax(f(blur(x)))_c); L = minmax(ReLU(Σ_g s_g M_g)).
  G forwards per image instead of K.
"""

from __future__ import annotations

import torch

from unioncam.base import BaseCAM, validate_inputs
from unioncam.metrics import gaussian_blur
from unioncam.ops import minmax, upsample

__all__ = ["REGION_METHODS", "score_cam", "group_cam", "ScoreCAM", "GroupCAM", "RegionMaps"]

REGION_METHODS = ("scorecam", "groupcam")

# Channel maps upsampled at once while measuring each mask's range.
_RANGE_CHUNK = 256


class RegionMaps:
    """A region method's output: normalised maps, raw low-res map and per-mask scores."""

    __slots__ = ("maps", "raw", "scores", "forwards")

    def __init__(self, maps, raw, scores, forwards) -> None:
        self.maps = maps  # N×H×W in [0,1]
        self.raw = raw  # N×h×w (Score-CAM: Σ s_k A_k) or N×H×W (Group-CAM: Σ s_g M_g)
        self.scores = scores  # N×K (or N×G): score of every mask, 0 for skipped channels
        self.forwards = forwards  # masked forward passes spent (an int, known on the host)


def _mask_range(activation: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of every upsampled channel map, without holding all of them at once."""
    flat = activation.flatten(0, 1)
    lo = torch.empty(flat.shape[0], device=flat.device, dtype=flat.dtype)
    hi = torch.empty_like(lo)
    for s in range(0, flat.shape[0], _RANGE_CHUNK):
        u = upsample(flat[s:s + _RANGE_CHUNK], size).flatten(1)
        lo[s:s + u.shape[0]] = u.amin(1)
        hi[s:s + u.shape[0]] = u.amax(1)
    return lo, hi


def score_cam(engine: BaseCAM, x: torch.Tensor, activation: torch.Tensor,
              classes: torch.Tensor) -> RegionMaps:
    """Batched, exact Score-CAM for the images ``x`` given their hooked activations."""
    n, k = activation.shape[:2]
    size = (x.shape[-2], x.shape[-1])
    flat = activation.flatten(0, 1)
    lo, hi = _mask_range(activation, size)
    pairs = (hi > lo).nonzero()[:, 0]  # the one host sync: how many forwards to schedule
    image_of = pairs // k
    span = hi - lo

    def make_inputs(j: torch.Tensor) -> torch.Tensor:
        p = pairs[j]
        masks = (upsample(flat[p], size) - lo[p, None, None]) / span[p, None, None]
        return x[image_of[j]] * masks[:, None]

    probs = engine.masked_probs(pairs.numel(), make_inputs, classes[image_of], x.device)
    scores = torch.zeros(n * k, device=x.device, dtype=torch.float32)
    scores[pairs] = probs
    scores = scores.view(n, k)
    raw = (scores[:, :, None, None] * activation).sum(1)
    maps = minmax(upsample(raw, size).clamp_min(0))
    return RegionMaps(maps, raw, scores, int(pairs.numel()))


def group_cam(engine: BaseCAM, x: torch.Tensor, activation: torch.Tensor, gradient: torch.Tensor,
              classes: torch.Tensor, groups: int = 32, blur_kernel: int = 51,
              blur_sigma: float = 50.0) -> RegionMaps:
    """Batched Group-CAM: G masked forwards per image on a blurred background."""
    n, k = activation.shape[:2]
    if not 1 <= groups <= k:
        raise ValueError(f"groups must be in [1, {k}] for this layer ({k} channels), got {groups}")
    size = (x.shape[-2], x.shape[-1])
    weighted = gradient.mean((-2, -1), keepdim=True) * activation
    group_of = torch.arange(k, device=x.device) * groups // k
    low = torch.zeros(n, groups, *activation.shape[-2:], device=x.device, dtype=activation.dtype)
    low.index_add_(1, group_of, weighted)
    masks = minmax(upsample(low.clamp_min(0), size))  # N×G×H×W
    blurred = gaussian_blur(x, blur_kernel, blur_sigma)
    base = engine.probs_of(blurred, classes)
    flat_masks = masks.flatten(0, 1)

    def make_inputs(j: torch.Tensor) -> torch.Tensor:
        img = j // groups
        m = flat_masks[j][:, None]
        return x[img] * m + blurred[img] * (1 - m)

    probs = engine.masked_probs(n * groups, make_inputs, classes.repeat_interleave(groups), x.device)
    scores = (probs.view(n, groups) - base[:, None]).clamp_min(0)
    raw = (scores[:, :, None, None] * masks).sum(1).clamp_min(0)
    return RegionMaps(minmax(raw), raw, scores, n * groups + n)


class ScoreCAM(BaseCAM):
    """Score-CAM alone, batched: ``with ScoreCAM(model, "layer4") as cam: maps = cam(x)``.

    ``cam.last`` holds the classes, probabilities, per-channel scores and the
    number of masked forwards of the last call.
    """

    needs_gradient = False

    def __init__(self, model, target_layer=None, **kwargs) -> None:
        super().__init__(model, target_layer, **kwargs)
        self.last: dict = {}

    def _run(self, x, fwd) -> RegionMaps:
        return score_cam(self, x, fwd.activation, fwd.classes)

    def __call__(self, x: torch.Tensor, targets=None) -> torch.Tensor:
        validate_inputs(x, targets)
        fwd = self.gradient_pass(x, targets, need_grad=self.needs_gradient)
        out = self._run(x, fwd)
        self.last = {"classes": fwd.classes, "probs": fwd.probs, "scores": out.scores,
                     "raw": out.raw, "forwards": out.forwards}
        return out.maps


class GroupCAM(ScoreCAM):
    """Group-CAM alone: G masked forwards per image instead of K."""

    needs_gradient = True

    def __init__(self, model, target_layer=None, *, groups: int = 32, blur_kernel: int = 51,
                 blur_sigma: float = 50.0, **kwargs) -> None:
        super().__init__(model, target_layer, **kwargs)
        self.groups, self.blur_kernel, self.blur_sigma = groups, blur_kernel, blur_sigma

    def _run(self, x, fwd) -> RegionMaps:
        return group_cam(self, x, fwd.activation, fwd.gradient, fwd.classes, self.groups,
                         self.blur_kernel, self.blur_sigma)
