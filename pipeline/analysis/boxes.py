"""Localisation against object boxes: energy in the boxes, maximum in a box, IoU.

Why: descriptors say where a map looks; boxes say where the object is, so together they
tell "looks at the object" from "looks at the background" (the energy-based pointing
game of the Score-CAM paper, Wang et al. 2020; saliency mass inside object boxes as a
dataset-level bias measure, as in Salient ImageNet).

Inputs (``unioncam analyze --boxes FILE``), boxes in the original photo's pixels:

* ImageNet's ``LOC_val_solution.csv``: ``ImageId,PredictionString`` with
  ``synset x1 y1 x2 y2`` repeated per box; ``ImageId`` is the file name without extension
  (``ILSVRC2012_val_00000001``); synsets are mapped to ImageNet-1k class indices.
* a generic CSV with one box per line: ``uri`` (or ``file``/``image``: the manifest's URI,
  or its file name, with or without extension), ``class`` (index or synset; empty = any
  class), ``x1,y1,x2,y2``; several lines per image.

Rows are matched to boxes through the manifest's URIs (their file names). A row is
scored against the boxes of its **label** (the ground truth; ImageNet's boxes are of the
label's class), or every box of the photo when the boxes carry no class; a row with no
such box, or no label, is not scored (NaN).

Coordinates: a box ``(x1, y1, x2, y2)`` is mapped through the stored ``crop_box``
``(left, top, right, bottom)`` into map pixels, ``u = (x - left) * W / (right - left)``;
a map pixel is *in* a box when its centre is. A box, or the part of a box, outside the
crop counts as outside (the model did not see it): a box wholly outside the crop covers
no pixel. Per row, with ``B`` the union of the row's boxes on the map:

* ``energy_in_box``: ``sum(m[B]) / sum(m)``, the energy-based pointing game;
* ``max_in_box``: 1 if the map's maximum (first in row-major order) is in ``B``, else 0;
* ``box_iou``: IoU of ``{m >= 0.5}`` and ``B``.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence

import numpy as np

__all__ = ["LOCALISATION", "box_mask", "load_boxes", "localisation", "match_rows"]

#: The per-row localisation scores, in the order :func:`localisation` returns them.
LOCALISATION = ("energy_in_box", "max_in_box", "box_iou")

Box = tuple[int, float, float, float, float]  # class (-1 = any), x1, y1, x2, y2


def _key(uri: str) -> str:
    """A file's match key: its name without folders and extension."""
    name = re.split(r"[\\/]", str(uri).rstrip("/"))[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def load_boxes(path: str | os.PathLike[str], synsets: Sequence[str] | None = None
               ) -> dict[str, list[Box]]:  # fmt: skip
    """Boxes by file key (see the module docstring for the two formats)."""
    text = open(path, encoding="utf-8").read()
    reader = csv.DictReader(io.StringIO(text))
    cols = {c.strip().lower(): c for c in reader.fieldnames or []}
    index = {s: i for i, s in enumerate(synsets or [])}

    def cls(token: str, where: str) -> int:
        token = token.strip()
        if not token:
            return -1
        if re.fullmatch(r"\d+", token):
            return int(token)
        if token not in index:
            raise ValueError(f"boxes {path} {where}: class {token!r} is not an ImageNet synset")
        return index[token]

    out: dict[str, list[Box]] = {}
    if "imageid" in cols and "predictionstring" in cols:
        for n, row in enumerate(reader, start=2):
            words = row[cols["predictionstring"]].split()
            if len(words) % 5:
                raise ValueError(f"boxes {path} line {n}: PredictionString is not groups of "
                                 "'synset x1 y1 x2 y2'")  # fmt: skip
            key = _key(row[cols["imageid"]])
            for j in range(0, len(words), 5):
                c = cls(words[j], f"line {n}")
                x1, y1, x2, y2 = (float(v) for v in words[j + 1 : j + 5])
                out.setdefault(key, []).append((c, x1, y1, x2, y2))
        return out
    uc = next((cols[c] for c in ("uri", "file", "image", "path") if c in cols), None)
    need = [cols.get(c) for c in ("x1", "y1", "x2", "y2")]
    if uc is None or None in need:
        raise ValueError(f"boxes {path}: expected LOC_val_solution.csv (ImageId,PredictionString) "
                         f"or columns uri,class,x1,y1,x2,y2; found {reader.fieldnames}")  # fmt: skip
    cc = cols.get("class") or cols.get("label")
    for n, row in enumerate(reader, start=2):
        try:
            x1, y1, x2, y2 = (float(row[c]) for c in need)  # type: ignore[index]
        except ValueError:
            raise ValueError(f"boxes {path} line {n}: coordinates are not numbers") from None
        c = cls(row[cc] or "", f"line {n}") if cc else -1
        out.setdefault(_key(row[uc]), []).append((c, x1, y1, x2, y2))
    return out


def match_rows(uris: Sequence[str], labels: Sequence[int], boxes: dict[str, list[Box]]
               ) -> list[list[tuple[float, float, float, float]]]:  # fmt: skip
    """Per row, the boxes it is scored against: those of its label, or all when the boxes
    have no class (see the module docstring)."""
    out = []
    for uri, label in zip(uris, labels, strict=True):
        got = boxes.get(_key(uri), [])
        keep = [b[1:] for b in got if b[0] == -1 or (label >= 0 and b[0] == label)]
        out.append(keep)
    return out


def box_mask(crop_box: Sequence[int], boxes: Sequence[Sequence[float]], h: int, w: int
             ) -> np.ndarray:  # fmt: skip
    """The union of ``boxes`` (original pixels) on an ``h x w`` map of ``crop_box``."""
    left, top, right, bottom = (float(v) for v in crop_box)
    mask = np.zeros((h, w), bool)
    if right <= left or bottom <= top:
        return mask
    yc = top + (np.arange(h) + 0.5) * (bottom - top) / h  # pixel centres, original pixels
    xc = left + (np.arange(w) + 0.5) * (right - left) / w
    for x1, y1, x2, y2 in boxes:
        mask |= ((yc >= y1) & (yc < y2))[:, None] & ((xc >= x1) & (xc < x2))[None, :]
    return mask


def localisation(maps: np.ndarray, masks: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """``n x 3`` scores (:data:`LOCALISATION`) of ``n x H x W`` maps against box masks;
    NaN where ``scored`` is False or the map is not finite or has no mass."""
    m = np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float64), nan=0.0), 0, 1)
    n = len(m)
    out = np.full((n, len(LOCALISATION)), np.nan, dtype=np.float32)
    finite = np.isfinite(np.asarray(maps, dtype=np.float64)).reshape(n, -1).all(1)
    flat = m.reshape(n, -1)
    b = np.asarray(masks, bool).reshape(n, -1)
    mass = flat.sum(1)
    ok = scored & finite & (mass > 0)
    if not ok.any():
        return out
    energy = (flat * b).sum(1) / np.maximum(mass, 1e-12)
    peak = b[np.arange(n), flat.argmax(1)].astype(np.float64)
    hot = flat >= 0.5
    union = (hot | b).sum(1)
    iou = np.where(union > 0, (hot & b).sum(1) / np.maximum(union, 1), 0.0)
    out[ok] = np.stack([energy, peak, iou], 1)[ok].astype(np.float32)
    return out
