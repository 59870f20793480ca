"""Read a store's ``analysis`` group: descriptors per row, tables per class and group,
strategies, comparison.

Why a separate reader: the analysis is written once by ``unioncam analyze``
(:mod:`pipeline.analysis.store_analysis`) and read many times (``query``, the atlas,
xarray, your notebook); this module only reads Zarr and knows the names below, so
:class:`~pipeline.analysis.reader.StoreReader` can hand it out without importing the
computation.

The group (every array has ``dimension_names``; each subgroup opens with
``xarray.open_zarr(STORE, group="analysis/rows")`` etc.):

* ``analysis/rows`` (dim ``image``): one array per descriptor
  (:data:`~pipeline.analysis.descriptors.DESCRIPTORS`), ``described`` (uint8: 1 = described,
  0 = no map because the row failed, 2 = bad map: NaN/inf, flat or unreadable; 255 = not
  analysed yet), ``thumbs`` (``image, ty, tx`` float16: the map area-averaged to the
  thumbnail side), ``group`` (index into ``analysis/groups/group``), ``strategy`` (index of
  the row's strategy in its group, -1 = none) and ``strategy_distance``; with ``--boxes``
  also ``energy_in_box``, ``max_in_box`` and ``box_iou`` (:mod:`pipeline.analysis.boxes`).
* ``analysis/classes`` (dim ``class``): ``class`` (the class index), ``group``, ``count``
  (described rows), ``<descriptor>_mean``, ``<descriptor>_std``, ``mean_map``
  (``class, ty, tx``).
* ``analysis/groups`` (dims ``group``, ``strategy``, ``exemplar``, ``rank``, ``ty``,
  ``tx``): ``group`` (names), ``count``, ``k``, ``silhouette``, ``clever_hans``,
  ``clever_hans_strategy``, ``sizes``, ``centroids`` (unit-norm thumbnails at the
  clustering side ``cy, cx``), ``exemplars`` (row ids nearest each centroid, -1 = none),
  ``off_object`` (rows with the most border mass, -1 = none), ``mean_map``,
  ``<descriptor>_mean``.
* ``analysis/compare`` (when a comparison was run): ``spearman`` and ``top_iou``
  (dim ``image``), and per class ``class``, ``count``, ``spearman_mean``, ``top_iou_mean``.

The group's attributes hold the parameters, the source store's fingerprints, the units
analysed and the counts of skipped rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline.analysis.boxes import LOCALISATION
from pipeline.analysis.descriptors import DESCRIPTORS

__all__ = [
    "ANALYSIS",
    "DESCRIBED",
    "AnalysisResults",
    "GroupStrategies",
    "create_array",
    "open_analysis",
]

#: The group's path inside the store.
ANALYSIS = "analysis"
#: Codes of ``analysis/rows/described``.
DESCRIBED = {"NO_MAP": 0, "DESCRIBED": 1, "BAD_MAP": 2, "NOT_ANALYSED": 255}


@dataclass
class GroupStrategies:
    """One group's (or class's) strategies, as read from the store."""

    group: str
    count: int
    k: int
    silhouette: float
    clever_hans: float
    clever_hans_strategy: int
    sizes: list[int]
    centroids: np.ndarray  # k x cy x cx
    exemplars: list[list[int]]
    off_object: list[int]
    mean_map: np.ndarray
    classes: list[int]


def create_array(store: Any, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any,
            fill: Any, dims: tuple[str, ...], attrs: dict[str, Any] | None = None) -> zarr.Array:
    """An array of the ``analysis`` group (the analysis's writer only: created over any
    earlier one), with its dimension names for xarray."""
    return zarr.create_array(store, name=f"{ANALYSIS}/{name}", shape=shape, chunks=chunks,
                             dtype=dtype, fill_value=fill, dimension_names=dims,
                             attributes=attrs or {}, overwrite=True)  # fmt: skip


def _sub(store: Any, path: str) -> zarr.Group | None:
    try:
        return zarr.open_group(store, path=path, mode="r", use_consolidated=False)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return None


def open_analysis(store: Any) -> AnalysisResults | None:
    """The analysis of a store (a zarr ``Store`` object), or None when it has none."""
    g = _sub(store, ANALYSIS)
    if g is None or "units" not in g.attrs:
        return None
    return AnalysisResults(store, g)


#: The arrays of the ``groups`` table a :class:`GroupStrategies` is read from.
_STRATEGY_ARRAYS = ("k", "exemplars", "off_object", "count", "silhouette", "clever_hans",
                    "clever_hans_strategy", "sizes", "centroids", "mean_map")


class AnalysisResults:
    """What ``unioncam analyze`` stored (see the module docstring for the layout)."""

    def __init__(self, store: Any, group: zarr.Group) -> None:
        self.store = store
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.rows = _sub(store, f"{ANALYSIS}/rows")
        self.classes = _sub(store, f"{ANALYSIS}/classes")
        self.groups = _sub(store, f"{ANALYSIS}/groups")
        self.compare = _sub(store, f"{ANALYSIS}/compare")
        if self.compare is not None and "spearman" not in self.compare:
            self.compare = None

    @property
    def complete(self) -> bool:
        """Whether every unit of the store was finished (and analysed) when it ran."""
        return bool(self.attrs.get("complete"))

    def _col(self, g: zarr.Group | None, name: str) -> np.ndarray:
        if g is None or name not in g:
            raise KeyError(f"the analysis has no {name!r}")
        return np.asarray(g[name][...])

    # ---------------------------------------------------------------- classes
    def class_table(self) -> list[dict[str, Any]]:
        """One dict per class: ``class``, ``group`` (name), ``count``, each descriptor's
        mean and std (``<name>``, ``<name>_std``; with boxes also ``energy_in_box``,
        ``max_in_box``, ``box_iou`` over the rows that have a box), its group's
        ``clever_hans``, and the
        comparison's ``spearman``/``top_iou`` means when a comparison was stored."""
        if self.classes is None:
            return []
        cls = self._col(self.classes, "class")
        gi = self._col(self.classes, "group")
        names = self.group_names()
        ch = self._col(self.groups, "clever_hans") if self.groups is not None else None
        cnt = self._col(self.classes, "count")
        names_ = (*DESCRIPTORS, *(n for n in LOCALISATION if f"{n}_mean" in self.classes))
        cols = {d: self._col(self.classes, f"{d}_mean") for d in names_}
        stds = {d: self._col(self.classes, f"{d}_std") for d in names_}
        cmp: dict[int, tuple[float, float]] = {}
        if self.compare is not None and "class" in self.compare:
            for c, s, t in zip(self._col(self.compare, "class").tolist(),
                               self._col(self.compare, "spearman_mean").tolist(),
                               self._col(self.compare, "top_iou_mean").tolist(), strict=True):
                cmp[int(c)] = (s, t)  # fmt: skip
        out = []
        for i, c in enumerate(cls.tolist()):
            g = int(gi[i])
            row: dict[str, Any] = {
                "class": int(c),
                "group": names[g] if 0 <= g < len(names) else "",
                "count": int(cnt[i]),
            }
            for d in names_:
                row[d] = float(cols[d][i])
                row[f"{d}_std"] = float(stds[d][i])
            row["clever_hans"] = float(ch[g]) if ch is not None and 0 <= g < len(ch) else 0.0
            if cmp:
                s, t = cmp.get(int(c), (float("nan"), float("nan")))
                row["spearman"], row["top_iou"] = float(s), float(t)
            out.append(row)
        return out

    def class_mean_maps(self) -> dict[int, np.ndarray]:
        """Every class's mean map (class -> thumbnail-side map), from one read."""
        if self.classes is None:
            return {}
        maps = np.asarray(self.classes["mean_map"][...])
        return {int(c): maps[i] for i, c in enumerate(self._col(self.classes, "class").tolist())}

    # ---------------------------------------------------------------- groups
    def group_names(self) -> list[str]:
        if self.groups is None:
            return []
        return [str(v) for v in self._col(self.groups, "group").tolist()]

    def group_table(self) -> list[dict[str, Any]]:
        """One dict per group: ``group``, ``count``, ``k``, ``silhouette``, ``clever_hans``
        and each descriptor's mean, sorted by name."""
        if self.groups is None:
            return []
        cols = {n: self._col(self.groups, n) for n in ("count", "k", "silhouette", "clever_hans")}
        means = {d: self._col(self.groups, f"{d}_mean") for d in DESCRIPTORS}
        out = []
        for i, name in enumerate(self.group_names()):
            row: dict[str, Any] = {"group": name}
            row.update({n: (int(v[i]) if v.dtype.kind in "iu" else float(v[i]))
                        for n, v in cols.items()})  # fmt: skip
            row.update({d: float(means[d][i]) for d in DESCRIPTORS})
            out.append(row)
        return out

    def group_index(self, name: str) -> int:
        names = self.group_names()
        if name not in names:
            raise ValueError(f"no group {name!r} in the analysis; groups: {', '.join(names)}")
        return names.index(name)

    def group_of_class(self, c: int) -> str:
        """The group the class was analysed in."""
        cls = self._col(self.classes, "class")
        hit = np.nonzero(cls == int(c))[0]
        if not len(hit):
            raise ValueError(f"class {c} has no analysed rows in this store")
        return self.group_names()[int(self._col(self.classes, "group")[int(hit[0])])]

    def strategies(self, group: str) -> GroupStrategies:
        """The strategies of one group (for per-class analyses the group is the class
        index as text; :meth:`group_of_class` finds a class's group)."""
        return self._strategies(self.group_index(group), group, self.groups,
                                self._col(self.classes, "group"))  # fmt: skip

    def all_strategies(self) -> list[GroupStrategies]:
        """Every group's strategies, in :meth:`group_names` order, from one whole read of
        each array (a call of :meth:`strategies` per group is ~11 element reads: ~50 s for
        ImageNet's 1,000 classes)."""
        if self.groups is None:
            return []
        g = {n: np.asarray(self.groups[n][:]) for n in _STRATEGY_ARRAYS}
        gi = self._col(self.classes, "group")
        return [self._strategies(i, name, g, gi) for i, name in enumerate(self.group_names())]

    def _strategies(self, i: int, group: str, g: Any, gi: np.ndarray) -> GroupStrategies:
        """Group ``i``'s strategies from ``g`` (the zarr group, or its arrays read whole);
        ``gi``: every class's group index."""
        k = int(g["k"][i])
        ex = np.asarray(g["exemplars"][i])[:k]
        off = np.asarray(g["off_object"][i])
        cls = self._col(self.classes, "class")
        return GroupStrategies(
            group=group,
            count=int(g["count"][i]),
            k=k,
            silhouette=float(g["silhouette"][i]),
            clever_hans=float(g["clever_hans"][i]),
            clever_hans_strategy=int(g["clever_hans_strategy"][i]),
            sizes=[int(v) for v in np.asarray(g["sizes"][i])[:k]],
            centroids=np.asarray(g["centroids"][i])[:k],
            exemplars=[[int(r) for r in e if r >= 0] for e in ex],
            off_object=[int(r) for r in off if r >= 0],
            mean_map=np.asarray(g["mean_map"][i]),
            classes=[int(c) for c in cls[gi == i]],
        )

    def clever_hans_ranking(self) -> list[tuple[str, float]]:
        """Groups by Clever-Hans score, highest first (ties by name)."""
        rows = self.group_table()
        return sorted(((r["group"], r["clever_hans"]) for r in rows),
                      key=lambda t: (-t[1], t[0]))  # fmt: skip

    # ---------------------------------------------------------------- rows
    def row_columns(self, names: list[str], start: int = 0, stop: int | None = None
                    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Per-row analysis arrays (descriptors, ``described``, ``group``, ``strategy``,
        ``strategy_distance``; ``spearman``/``top_iou`` of a comparison) for rows
        ``[start, stop)``."""
        out = {}
        for n in names:
            g = self.compare if n in ("spearman", "top_iou") else self.rows
            out[n] = np.asarray(self._arr(g, n)[start:stop])
        return out

    def _arr(self, g: zarr.Group | None, name: str) -> zarr.Array:
        if g is None or name not in g:
            raise KeyError(f"the analysis has no {name!r}")
        return g[name]
