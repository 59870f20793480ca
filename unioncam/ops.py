"""Small tensor operations shared by the CAMs (the Gaussian blur lives in ``metrics``).

Everything here is batched and stays on the input's device; none of it syncs
with the host, so it can sit inside the loops over masked-input chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["minmax", "upsample", "percentile"]

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
