"""A unit's rows as the store keeps them: THE mapping from the library's result (and the
``null`` explainer's stand-in) to the per-row arrays a :class:`~pipeline.store.units.UnitWriter`
writes. One place, so the library's names, the store's arrays and the reader's columns stay
one vocabulary.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.run.plan import UnitContext

__all__ = ["empty_unit_arrays", "null_maps", "rows_from_result", "stored_maps"]


def empty_unit_arrays(n: int, ctx: UnitContext) -> dict[str, np.ndarray]:
    """Arrays for ``n`` rows, every row pre-marked as "not explained" (NaN / -1).

    The store's layout is the one list of arrays, dtypes and fill values.
    """
    return ctx.layout.empty_rows(n)


def stored_maps(maps: Any, map_size: tuple[int, int]) -> np.ndarray:
    """``(N, H, W)`` maps (a tensor on any device) as the store keeps them: float32 numpy at
    the layout's ``map_size``, area-downsampled on the device when smaller than the input
    (an average over each stored pixel's footprint: what a coarser CAM would show)."""
    if tuple(maps.shape[-2:]) != tuple(map_size):
        import torch.nn.functional as F

        maps = F.interpolate(maps[:, None].float(), size=tuple(map_size), mode="area")[:, 0]
    return maps.float().cpu().numpy()


def null_maps(u: int, n: int, size: tuple[int, int]) -> np.ndarray:
    """The ``null`` explainer's maps: smooth CAM-like blobs in [0, 1] (a 7x7 grid upsampled
    bilinearly, min-max normalised), seeded by the unit so a rewrite is byte-identical.
    Not zeros: zeros compress to nothing and would hide what a real map costs the store."""
    rng = np.random.default_rng(int(u))
    grid = rng.random((n, 7, 7), dtype=np.float32) ** 3

    def interp(out: int) -> np.ndarray:  # (out, 7) bilinear weights, align_corners=False
        pos = np.clip((np.arange(out) + 0.5) * 7 / out - 0.5, 0, 6)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, 6)
        w = np.zeros((out, 7), np.float32)
        np.add.at(w, (np.arange(out), lo), 1 - (pos - lo))
        np.add.at(w, (np.arange(out), hi), pos - lo)
        return w

    ay, ax = interp(size[0]), interp(size[1])
    m = np.einsum("yi,nij,xj->nyx", ay, grid, ax, optimize=True)
    lo, hi = m.min((1, 2), keepdims=True), m.max((1, 2), keepdims=True)
    return (m - lo) / np.maximum(hi - lo, 1e-12)


def rows_from_result(res: Any, map_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """THE mapping from the library's result to the store's per-row arrays (one place).

    ``res`` is a UnionCAM :class:`unioncam.CAMResult`; the store's arrays carry the same
    names (see :meth:`pipeline.store.layout.StoreLayout.arrays`): ``beta`` is the confidence
    gain of every member, ``selection_score`` what the selection rule ranked by (β itself
    for the ``beta`` rule), ``target`` the class explained.
    """
    out = {
        "maps": stored_maps(res.maps, map_size or tuple(res.maps.shape[-2:])),
        "target": res.target.cpu().numpy(),
        "prob": res.prob.float().cpu().numpy(),
    }
    if res.selected is not None:  # UnionCAM's own fields (another method's result has none)
        out |= {
            "beta": res.beta.float().cpu().numpy(),
            "selection_score": res.selection_score.float().cpu().numpy(),
            "selected": res.selected.cpu().numpy(),
            "baseline_prob": res.baseline_prob.float().cpu().numpy(),
        }
    return out
