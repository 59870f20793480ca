"""Tensor operations shared by the methods, the selection rules and the metrics.

One place for each: min–max normalisation, bilinear upsampling, percentiles, the
Gaussian blur (Group-CAM's background, the insertion baseline, ``beta-blur``) and the
pixel ranking that selection rules and insertion/deletion must share exactly (a rule
that probes "the top 20 % of pixels" has to mean the same pixels the metric removes).

Everything is batched and stays on the input's device; nothing here syncs with the
host, so all of it can sit inside the loops over masked-input chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["EPS", "minmax", "upsample", "percentile", "gaussian_kernel1d", "gaussian_blur",
           "pixel_ranks", "is_flat"]

EPS = 1e-8


def minmax(maps: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Min–max normalise each map over its last two dims: (L − min) / (max − min + eps).

    The ``eps`` (the paper's 1e-8) makes a constant map all zeros instead of NaN.
    """
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True).unsqueeze(-1)
    hi = flat.amax(-1, keepdim=True).unsqueeze(-1)
    return (maps - lo) / (hi - lo + eps)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of ``…×h×w`` maps to ``…×H×W``."""
    lead = maps.shape[:-2]
    out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]), size=size, mode="bilinear",
                        align_corners=False)
    return out.reshape(*lead, *size)


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile over the last dim with linear interpolation.

    Same definition as ``numpy.percentile``/``torch.quantile`` (linear), written
    with a sort so it has no size limit (``torch.quantile`` refuses inputs above
    16M elements, which a batch of 1280-channel maps can reach).
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"theta must be a percentile in [0, 100], got {q}")
    n = values.shape[-1]
    s, _ = values.sort(dim=-1)
    pos = (q / 100.0) * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return s[..., lo] + (s[..., hi] - s[..., lo]) * frac


def gaussian_kernel1d(kernel: int = 11, sigma: float = 5.0, *, dtype: torch.dtype = torch.float32,
                      device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian ``exp(-d² / (2σ²))`` on ``d = -(k//2) .. k//2``.

    The 2-D blur kernel is the outer product of this with itself (sums to 1). RISE builds its
    kernel by ``scipy.ndimage.gaussian_filter`` of an 11×11 delta (reflect mode), a slightly
    flatter shape; the plain truncated Gaussian is exactly reproducible and separable.
    """
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"blur kernel must be a positive odd int, got {kernel!r}")
    if not (isinstance(sigma, int | float) and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"blur sigma must be a positive finite number, got {sigma!r}")
    d = torch.arange(kernel, dtype=torch.float64) - (kernel // 2)
    k = torch.exp(-(d**2) / (2.0 * float(sigma) ** 2))
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, kernel: int = 11, sigma: float = 5.0, *,
                  padding: str = "zeros") -> torch.Tensor:
    """Blur ``N×C×H×W`` images with a depthwise Gaussian (separable, same output size).

    ``padding="zeros"`` (default) matches RISE's ``conv2d(..., padding=klen//2)``: pixels near
    the border are pulled towards 0, i.e. towards the dataset mean in normalised space.
    ``padding="reflect"`` mirrors the image instead (needs ``H, W > kernel // 2``).
    Separable 1-D passes give exactly the 2-D outer-product convolution for both paddings,
    at ``2k`` instead of ``k²`` multiply-adds per pixel.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"gaussian_blur: x must be a N×C×H×W tensor, got {shape}")
    if padding not in ("zeros", "reflect"):
        raise ValueError(f"gaussian_blur: padding must be 'zeros' or 'reflect', got {padding!r}")
    n, c, h, w = x.shape
    pad = kernel // 2
    if padding == "reflect" and (h <= pad or w <= pad):
        raise ValueError(f"gaussian_blur: padding='reflect' needs H and W > {pad}, got {h}x{w}")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    k = gaussian_kernel1d(kernel, sigma, dtype=dtype, device=x.device)
    kw = k.view(1, 1, 1, kernel).expand(c, 1, 1, kernel)
    kh = k.view(1, 1, kernel, 1).expand(c, 1, kernel, 1)
    y = x.to(dtype)
    if padding == "zeros":
        y = F.conv2d(y, kw, padding=(0, pad), groups=c)
        return F.conv2d(y, kh, padding=(pad, 0), groups=c)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), kw, groups=c)
    return F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), kh, groups=c)


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """``rank[..., i]`` = position of pixel ``i`` when each map is sorted by descending value.

    Input ``…×H×W``, output ``…×H×W`` int32. A stable sort, so ties go to the lower flat index
    (``row · W + col``); ``rank < m`` is then the map's top-m pixel mask. This one ordering
    is used by the selection rules and by insertion/deletion, so a rule's probes are the very
    inputs the metric builds. int32 keeps a 64-image × 7-member × 224² tensor at 90 MB.
    """
    *lead, h, w = maps.shape
    flat = maps.reshape(-1, h * w)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    rank = torch.empty(flat.shape, dtype=torch.int32, device=maps.device)
    src = torch.arange(h * w, device=maps.device, dtype=torch.int32).expand_as(rank)
    rank.scatter_(-1, order, src)
    return rank.view(*lead, h, w)


def is_flat(maps: torch.Tensor) -> torch.Tensor:
    """True for each ``H×W`` map whose values are all equal (it has no ranking)."""
    flat = maps.flatten(-2)
    return flat.amax(-1) <= flat.amin(-1)
