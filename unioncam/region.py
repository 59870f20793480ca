"""Region-based CAMs: each channel (or group of channels) becomes a mask whose
masked forward pass scores it.

The cost of these methods is the masked forwards — K per image for Score-CAM
(up to 1280 at EfficientNet-Lite0's head). Everything else here exists to make
those forwards the *only* cost: masks are built per chunk on the device from
the low-resolution activation (never an N×K×H×W tensor), constant channels
are skipped before scheduling, the (image, channel) pairs of the whole batch
are flattened into one queue of the engine so every forward is a full chunk, and the
final map is Σ_k s_k·A_k at low resolution, upsampled once (bilinear resizing is
linear, so this equals Σ_k s_k·U_k).

Registered in :data:`REGION_METHODS` by name:

* ``scorecam`` — Score-CAM (Wang et al. 2020, as in its authors' code): U_k = bilinear
  upsample of A_k; M_k = minmax(U_k), channels with max = min skipped;
  s_k = softmax(f(x ⊙ M_k))_c; L = minmax(ReLU(Σ_k s_k U_k)).
* ``groupcam`` — Group-CAM (Zhang et al. 2021): channels split into G contiguous groups
  (channel k → group ⌊kG/K⌋); M_g = minmax(upsample(ReLU(Σ_{k∈g} w_k A_k))),
  w_k = mean G_k; x'_g = x ⊙ M_g + blur(x) ⊙ (1 − M_g);
  s_g = ReLU(softmax(f(x'_g))_c − softmax(f(blur(x)))_c); L = minmax(ReLU(Σ_g s_g M_g)).
  G forwards per image instead of K.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from unioncam.cam import BaseCAM, CAMResult, Forward
from unioncam.engine import Engine
from unioncam.ops import gaussian_blur, minmax, upsample
from unioncam.registry import METHODS, Registry

__all__ = ["REGION_METHODS", "RegionMaps", "score_cam", "group_cam", "RegionCAM", "ScoreCAM",
           "GroupCAM"]

# Channel maps upsampled at once while measuring each mask's range.
_RANGE_CHUNK = 256


class RegionMaps(NamedTuple):
    """A region method's output: normalised maps, raw map and per-mask scores."""

    maps: torch.Tensor  # N×H×W in [0,1]
    raw: torch.Tensor  # N×h×w (Score-CAM: Σ s_k A_k) or N×H×W (Group-CAM: Σ s_g M_g)
    scores: torch.Tensor  # N×K (or N×G): score of every mask, 0 for skipped channels
    forwards: int  # masked forward passes spent (known on the host)


#: name -> fn(engine, x, fwd, groups=...) -> RegionMaps; info: whether it needs gradients.
REGION_METHODS: Registry[Callable[..., RegionMaps]] = Registry("region method")


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


@REGION_METHODS.register("scorecam", needs_gradient=False)
def score_cam(engine: Engine, x: torch.Tensor, fwd: Forward, **_: object) -> RegionMaps:
    """Batched, exact Score-CAM for the images ``x`` given their gradient pass."""
    activation, target = fwd.activation, fwd.target
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

    probs = engine.probs(pairs.numel(), make_inputs, target[image_of], x.device)
    scores = torch.zeros(n * k, device=x.device, dtype=torch.float32)
    scores[pairs] = probs
    scores = scores.view(n, k)
    raw = (scores[:, :, None, None] * activation).sum(1)
    maps = minmax(upsample(raw, size).clamp_min(0))
    return RegionMaps(maps, raw, scores, int(pairs.numel()))


@REGION_METHODS.register("groupcam", needs_gradient=True)
def group_cam(engine: Engine, x: torch.Tensor, fwd: Forward, groups: int = 32,
              blur_kernel: int = 51, blur_sigma: float = 50.0, **_: object) -> RegionMaps:
    """Batched Group-CAM: G masked forwards per image on a blurred background."""
    activation, gradient, target = fwd.activation, fwd.gradient, fwd.target
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
    base = engine.probs_of(blurred, target)
    flat_masks = masks.flatten(0, 1)

    def make_inputs(j: torch.Tensor) -> torch.Tensor:
        img = j // groups
        m = flat_masks[j][:, None]
        return x[img] * m + blurred[img] * (1 - m)

    probs = engine.probs(n * groups, make_inputs, target.repeat_interleave(groups), x.device)
    scores = (probs.view(n, groups) - base[:, None]).clamp_min(0)
    raw = (scores[:, :, None, None] * masks).sum(1).clamp_min(0)
    return RegionMaps(minmax(raw), raw, scores, n * groups + n)


class RegionCAM(BaseCAM):
    """A region method alone, batched: ``with ScoreCAM(model, "layer4") as cam: res = cam(x)``.

    ``res.mask_scores`` holds every mask's score, ``res.forwards`` the forwards spent.
    """

    method = "scorecam"

    def __init__(self, model, layer=None, *, method: str | None = None, **kwargs) -> None:
        self.params = {k: kwargs.pop(k) for k in ("groups", "blur_kernel", "blur_sigma")
                       if k in kwargs}
        super().__init__(model, layer, **kwargs)
        self.method = REGION_METHODS.check(method or self.method)
        self.needs_gradient = REGION_METHODS.info(self.method)["needs_gradient"]

    def explain(self, x: torch.Tensor, targets) -> CAMResult:
        fwd = self.gradient_pass(x, targets, need_grad=self.needs_gradient)
        out = REGION_METHODS[self.method](self, x, fwd, **self.params)
        return CAMResult(maps=out.maps, target=fwd.target, prob=fwd.prob,
                         forwards=x.shape[0] + out.forwards, raw=out.raw, mask_scores=out.scores)


@METHODS.register("scorecam", label="Score-CAM")
class ScoreCAM(RegionCAM):
    """Score-CAM: one masked forward per (non-constant) channel."""

    method = "scorecam"


@METHODS.register("groupcam", label="Group-CAM")
class GroupCAM(RegionCAM):
    """Group-CAM: G masked forwards per image (``groups``, default 32) on a blurred background."""

    method = "groupcam"

    def __init__(self, model, layer=None, *, groups: int = 32, blur_kernel: int = 51,
                 blur_sigma: float = 50.0, **kwargs) -> None:
        super().__init__(model, layer, groups=groups, blur_kernel=blur_kernel,
                         blur_sigma=blur_sigma, **kwargs)
