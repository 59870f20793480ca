"""Model-parameter randomisation: the sanity check of Adebayo et al. (NeurIPS 2018).

A saliency method that explains the *model* must give different maps when the model's
weights are destroyed. The cascading test re-initialises the model's blocks one by one
from the top (logits first) on a **copy** (the user's model is untouched) and compares each
step's maps with the original ones by Spearman rank correlation and SSIM. A method whose
maps barely change has failed: it is showing the image (edges, the input's structure),
not what the network computes.

Criterion used here (stated, one line): a method **passes** when, at the first step that
changes the target layer's output (the step that re-initialises the layer's block, or a
block the layer reads from), the mean Spearman correlation with the original maps is below
``0.5``. Adebayo et al. judge by eye from the curves; the threshold turns that into a number
a dataset-scale report can show, and the full curves are returned for the eye.

The layer's step is *measured* (one plain forward per step, comparing the layer's output
with the original's) rather than guessed from module names, because a target layer is often
not a block of its own: EfficientNet's ``_swish`` head activation follows ``_bn1``, a
ResNet's ``layer4`` is changed first by ``layer4.1``. Measuring it also lets a report stop
the cascade a few steps past the layer (``past_layer``): the deeper steps cost as much as
the first ones and do not change the verdict.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unioncam.hooks import resolve_layer
from unioncam.registry import METHODS

__all__ = ["SanityResult", "cascading_randomization", "randomization_steps", "spearman", "ssim",
           "PASS_THRESHOLD"]

PASS_THRESHOLD = 0.5


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps (``N×H×W`` → ``N``; ties by order)."""
    def ranks(t: Tensor) -> Tensor:
        flat = t.flatten(1)
        order = torch.sort(flat, dim=1, stable=True).indices
        r = torch.empty_like(flat)
        r.scatter_(1, order, torch.arange(flat.shape[1], device=t.device, dtype=flat.dtype)
                   .expand_as(flat))
        return r - r.mean(1, keepdim=True)

    ra, rb = ranks(a.double()), ranks(b.double())
    den = (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
    return ((ra * rb).sum(1) / den).float()


def ssim(a: Tensor, b: Tensor, *, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM (Wang et al. 2004) of each pair of maps in [0, 1] (``N×H×W`` → ``N``).

    Gaussian window 11, σ 1.5, C1 = 0.01², C2 = 0.03² (data range 1), valid region only:
    the constants of scikit-image's ``structural_similarity(gaussian_weights=True)``.
    """
    from unioncam.ops import gaussian_kernel1d

    x, y = a[:, None].double(), b[:, None].double()
    k = gaussian_kernel1d(window, sigma, dtype=torch.float64, device=a.device)
    kk = (k[:, None] * k[None, :]).view(1, 1, window, window)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kk)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def randomization_steps(model: nn.Module) -> list[str]:
    """The blocks re-initialised one after another, top (logits) first.

    A block is a module at depth two of the module tree (``layer4.2``, ``_blocks.15``,
    ``fc``) that holds parameters, in reverse registration order (for torchvision and
    timm models that is reverse forward order).
    """
    names = []
    for name, mod in model.named_modules():
        depth = name.count(".") + 1 if name else 0
        has_params = any(True for _ in mod.parameters(recurse=True))
        if not name or not has_params:
            continue
        children = [c for c in mod.children() if any(True for _ in c.parameters())]
        if depth == 2 or (depth == 1 and not children):
            names.append(name)
    return names[::-1]


def _reinit(module: nn.Module, generator_seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            elif any(True for _ in m.parameters(recurse=False)):
                for p in m.parameters(recurse=False):
                    nn.init.normal_(p, std=0.02)


@dataclass
class SanityResult:
    """Per step (``steps[0]`` = nothing randomised) and image: similarity to the original maps."""

    method: str
    steps: list[str]
    spearman: Tensor  # N × S
    ssim: Tensor  # N × S
    layer_step: int  # first step that changes the target layer's output
    threshold: float = PASS_THRESHOLD
    maps: list[Tensor] = field(default_factory=list, repr=False)

    @property
    def passes(self) -> bool:
        """Mean Spearman at ``layer_step`` below the threshold (see the module docstring)."""
        return float(self.spearman[:, self.layer_step].mean()) < self.threshold


def cascading_randomization(
    model: nn.Module,
    x: Tensor,
    method: str = "gradcam",
    layer: str | None = None,
    *,
    targets=None,
    steps: Sequence[str] | None = None,
    seed: int = 0,
    keep_maps: bool = False,
    past_layer: int | None = None,
    component: str | None = None,
    **cam_kwargs,
) -> SanityResult:
    """Cascading randomisation of ``model``'s blocks (on a copy) for the CAM ``method``.

    ``targets``: the class per image; ``None`` fixes the original model's prediction for
    every step (the question is whether the *map* of that class changes).
    ``steps``: block names, top first (default :func:`randomization_steps`).
    ``past_layer``: stop this many steps after the first one that changes the target
    layer's output (``None``: run every step). ``component``: check this component map of
    a UnionCAM (e.g. ``"fused:denoised+scorecam"``; its config needs
    ``return_components=True``) instead of the selected map. ``cam_kwargs`` go to the CAM
    (e.g. ``config="paper"`` for UnionCAM, ``chunk_size``).
    """
    if past_layer is not None and past_layer < 0:
        raise ValueError(f"sanity: past_layer must be >= 0, got {past_layer}")
    work = copy.deepcopy(model)
    names = list(steps) if steps is not None else randomization_steps(work)
    modules = dict(work.named_modules())
    for n in names:
        if n not in modules:
            raise ValueError(f"sanity: no module named {n!r} in the model")
    cam_cls = METHODS[method]

    def explain(tgt) -> tuple[Tensor, Tensor]:
        with cam_cls(work, layer, **cam_kwargs) as cam:
            res = cam(x, tgt)
        if component is None:
            return res.maps, res.target
        if not res.components or component not in res.components:
            have = ", ".join(res.components or ()) or "none (set return_components=True)"
            raise ValueError(f"sanity: no component {component!r}; the CAM returned: {have}")
        return res.components[component], res.target

    first_maps, tgt = explain(targets)
    target_layer = resolve_layer(work, layer, x[:1])  # the layer the CAM reads
    seen: list[Tensor] = []

    def grab(_m, _i, out):
        seen.append((out[0] if isinstance(out, tuple | list) else out).detach().clone())

    def layer_output() -> Tensor:
        seen.clear()
        handle = target_layer.module.register_forward_hook(grab)
        try:
            with torch.no_grad():
                work(x[:1])
        finally:
            handle.remove()
        return seen[target_layer.call if target_layer.call >= 0 else -1]

    reference = layer_output()
    maps = [first_maps]
    done: list[str] = []
    layer_step = None
    for i, n in enumerate(names):
        _reinit(modules[n], seed + i)
        done.append(n)
        maps.append(explain(tgt)[0])
        if layer_step is None and not torch.equal(layer_output(), reference):
            layer_step = i + 1
        if layer_step is not None and past_layer is not None and i + 1 >= layer_step + past_layer:
            break
    ref = maps[0]
    sp = torch.stack([spearman(m, ref) for m in maps], 1)
    ss = torch.stack([ssim(m, ref) for m in maps], 1)
    return SanityResult(method, ["original", *done], sp, ss,
                        layer_step if layer_step is not None else len(done),
                        maps=maps if keep_maps else [])
