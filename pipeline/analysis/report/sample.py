"""What a report is made of: per-image results from either source (an image folder or a store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.classes import load_class_names

__all__ = ['GalleryItem', 'ReportSample', 'class_names', 'cname']


@dataclass
class GalleryItem:
    """One gallery row: the crop the model saw and every method's map on it."""

    title: str
    image: np.ndarray | None  # H x W x 3 uint8 (None: original not available)
    maps: dict[str, np.ndarray]  # method -> H x W in [0, 1]
    scores: dict[str, float] = field(default_factory=dict)  # method -> ins − del


@dataclass
class ReportSample:
    """Per-image results, from either source, that the figures and tables are made of."""

    source: str  # "images" or "store"
    methods: list[str]  # display order; ``reference`` first
    labels: dict[str, str]  # method -> display name
    reference: str
    scores: dict[str, dict[str, np.ndarray]]  # method -> metric -> N values (NaN = missing)
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # method -> (insertion N×S+1, deletion)
    selection_counts: dict[str, int]
    classes: np.ndarray
    names: list[str]
    provenance: dict[str, Any]
    gallery: list[GalleryItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    # method -> randomisation check (pipeline.analysis.report.sanity.run_sanity); {} = not run
    sanity: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.classes.shape[0])


def class_names() -> list[str]:
    try:
        return load_class_names()
    except Exception:  # names are decoration; never fail a report for them
        return []


def cname(names: list[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else str(c)

