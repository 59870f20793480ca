"""Per-image descriptors of a map: where it puts its mass and how concentrated it is.

Why these: dataset-scale questions about a model ("does it look at the centre whatever the
photo?", "which images does it explain by the border?") need a few numbers per map that
can be averaged per class, sorted and plotted; these are the ones the saliency literature
uses (centre of mass and spread, area, entropy, centre bias, border mass).

Coordinates and regions (a map is ``H x W`` on the crop the model saw): pixel ``(i, j)``
has its centre at ``y = (i + 0.5) / H``, ``x = (j + 0.5) / W``, so the crop spans [0, 1]
on both axes whatever its size, and descriptors of 56-px and 224-px maps are comparable.
The map is clipped to [0, 1] (stored maps are in [0, 1]; the clip guards against float16
rounding) and its *mass* is ``p = m / m.sum()``.

* ``centre_y``, ``centre_x``: the centre of mass ``sum(p * y)``, ``sum(p * x)`` in [0, 1].
* ``spread``: the radius of gyration ``sqrt(sum(p * ((y - cy)^2 + (x - cx)^2)))`` in
  crop sides (0 = a point; a uniform map has ``sqrt(1/6) ~ 0.408``).
* ``area``: the fraction of pixels with ``m >= 0.5``.
* ``entropy``: Shannon entropy of ``p`` divided by ``log(H * W)``: 0 = all mass on one
  pixel, 1 = uniform.
* ``centre_bias``: the share of the mass on the *central region*, the pixels whose centre
  lies in ``[0.25, 0.75)`` on both axes (a quarter of the crop's area; a uniform map
  scores ~0.25).
* ``border``: the share of the mass on the *border band*, the pixels whose centre lies
  within ``0.1`` of any edge, i.e. ``y < 0.1 or y >= 0.9 or x < 0.1 or x >= 0.9`` (36 % of
  the area; a uniform map scores ~0.36).

A map that cannot be described (NaN or inf anywhere: a failed or unreadable row; or zero
mass: a flat map) gets NaN for every descriptor; :func:`describe` says which rows, so the
caller counts them instead of averaging NaN.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BORDER_BAND",
    "CENTRE_REGION",
    "DESCRIPTORS",
    "DESCRIPTOR_TITLES",
    "describe",
    "region_masks",
    "downsample",
    "thumbnails",
]

#: The descriptors, in the order :func:`describe` returns them.
DESCRIPTORS = ("centre_y", "centre_x", "spread", "area", "entropy", "centre_bias", "border")
#: One line per descriptor for tables and the atlas.
DESCRIPTOR_TITLES = {
    "centre_y": "centre of mass, y (0 top, 1 bottom)",
    "centre_x": "centre of mass, x (0 left, 1 right)",
    "spread": "radius of gyration (crop sides)",
    "area": "share of pixels >= 0.5",
    "entropy": "normalised entropy (1 = uniform)",
    "centre_bias": "mass share in the central quarter",
    "border": "mass share on the 10 % border band",
}
#: The central region: pixel centres in [lo, hi) on both axes.
CENTRE_REGION = (0.25, 0.75)
#: Width of the border band as a fraction of the crop side.
BORDER_BAND = 0.1


def _centres(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float64) + 0.5) / n


def region_masks(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``H x W`` masks of the central region and of the border band."""
    y, x = _centres(h)[:, None], _centres(w)[None, :]
    lo, hi = CENTRE_REGION
    centre = (y >= lo) & (y < hi) & (x >= lo) & (x < hi)
    b = BORDER_BAND
    border = (y < b) | (y >= 1 - b) | (x < b) | (x >= 1 - b)
    return centre, border


def describe(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of a batch of maps ``n x H x W``: ``(n x len(DESCRIPTORS) float32, valid)``.

    ``valid[i]`` is False for a map with a non-finite value or zero mass; its row is NaN.
    Works on the whole batch at once. The maps stay float32 (a unit of 56-px maps is
    memory-bound: float64 copies doubled the time); every sum over pixels accumulates in
    float64 (float16 maps summed over 50k pixels lose digits otherwise), and the moments
    and region masses are matrix products.
    """
    m = np.asarray(maps)
    if m.ndim != 3:
        raise ValueError(f"describe expects n x H x W maps, got shape {m.shape}")
    n, h, w = m.shape
    out = np.full((n, len(DESCRIPTORS)), np.nan, dtype=np.float32)
    flat = np.asarray(m, dtype=np.float32).reshape(n, -1)
    finite = np.isfinite(flat).all(1)
    if not finite.any():
        return out, finite
    flat = np.clip(flat[finite], 0.0, 1.0)
    mass = flat.sum(1, dtype=np.float64)
    valid = finite.copy()
    valid[finite] = mass > 0
    flat, mass = flat[mass > 0], mass[mass > 0]
    if not len(flat):
        return out, valid
    p = flat * (1.0 / mass).astype(np.float32)[:, None]
    y, x = _centres(h), _centres(w)
    py = p.reshape(-1, h, w).sum(2, dtype=np.float64)  # marginals
    px = p.reshape(-1, h, w).sum(1, dtype=np.float64)
    cy, cx = py @ y, px @ x
    var = py @ (y**2) - cy**2 + px @ (x**2) - cx**2
    spread = np.sqrt(np.maximum(var, 0.0))
    area = np.count_nonzero(flat >= 0.5, axis=1) / (h * w)
    logp = np.zeros_like(p)
    np.log(p, out=logp, where=p > 0)
    plogp = (p * logp).sum(1, dtype=np.float64)
    entropy = -plogp / np.log(h * w) if h * w > 1 else np.zeros(len(p))
    centre, border = region_masks(h, w)
    regions = np.stack([centre.reshape(-1), border.reshape(-1)], 1).astype(np.float32)
    cb, bb = (p @ regions).astype(np.float64).T
    out[valid] = np.stack([cy, cx, spread, area, entropy, cb, bb], 1).astype(np.float32)
    return out, valid


def _bin_matrix(n: int, side: int) -> np.ndarray:
    """``side x n`` averaging matrix: row ``i`` averages the pixels of bin ``i`` (pixel ``p``
    falls in bin ``p * side // n``: nearly equal bins when ``side`` does not divide ``n``)."""
    b = (np.arange(n) * side) // n
    m = (b[None, :] == np.arange(side)[:, None]).astype(np.float32)
    return m / m.sum(1, keepdims=True)


def downsample(maps: np.ndarray, side: int) -> np.ndarray:
    """Area-average ``n x H x W`` maps to ``n x side x side`` (NaN where a map is NaN).

    Two matrix products (``A_y @ m @ A_x^T``) rather than ``np.add.reduceat`` over two axes:
    BLAS makes them ~5x faster on a unit of 56-px maps; a map with a NaN anywhere comes out
    all NaN (the callers only pass whole valid or whole NaN maps)."""
    m = np.asarray(maps, dtype=np.float32)
    n, h, w = m.shape
    ay, ax = _bin_matrix(h, side), _bin_matrix(w, side)
    return np.matmul(ay, np.matmul(m, ax.T))


def thumbnails(maps: np.ndarray, side: int) -> np.ndarray:
    """Maps downsampled to ``side x side`` by area averaging, each scaled to unit L2 norm.

    Why: strategies are clustered on these (SpRAy clusters downsampled heatmaps); unit norm
    makes the Euclidean distance between two thumbnails ``sqrt(2 - 2 cos)``, so clusters
    group maps by *where* they look, not by how bright they are. A map whose side is not a
    multiple of ``side`` is averaged over pixel bins of nearly equal size. Invalid maps
    (non-finite or zero) come back as zeros.
    """
    m = np.asarray(maps, dtype=np.float32)
    n, h, w = m.shape
    m = np.clip(np.where(np.isfinite(m), m, 0.0), 0.0, 1.0)
    ybin = (np.arange(h) * side) // h
    xbin = (np.arange(w) * side) // w
    # Sum rows into bins, then columns (np.add.reduceat over bin starts).
    ys = np.searchsorted(ybin, np.arange(side))
    xs = np.searchsorted(xbin, np.arange(side))
    t = np.add.reduceat(np.add.reduceat(m, ys, axis=1), xs, axis=2)
    counts = np.outer(np.diff(np.append(ys, h)), np.diff(np.append(xs, w))).astype(np.float32)
    t = t / counts
    norm = np.sqrt((t.reshape(n, -1) ** 2).sum(1))
    bad = ~np.isfinite(np.asarray(maps, dtype=np.float32)).reshape(n, -1).all(1) | (norm == 0)
    norm[bad] = 1.0
    t = t / norm[:, None, None]
    t[bad] = 0.0
    return t
