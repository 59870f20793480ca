"""Overlays: a stored row's map on its original photo, one PNG per row.

The one place a stored map meets its photo (``query maps --overlay``, ``export
--overlays``, the demo; the atlas and the report draw through the same
:func:`pipeline.analysis.images.overlay_image`). Each row is read once.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.analysis.images import overlay_image
from pipeline.analysis.reader import StoreReader
from pipeline.store.layout import safe_name

__all__ = ["row_overlay", "write_overlays"]


def row_overlay(
    reader: StoreReader, row_id: int, *, alpha: float = 0.5, cmap: str = "jet", manifest: str | None = None,
    method: str | None = None, info: dict[str, Any] | None = None,
):
    """The row's map (of ``method``; ``None``: the store's primary) placed on its original
    image at the crop box the model saw (``PIL.Image``, RGB). ``info``: the row's
    :meth:`StoreReader.row`, when the caller has read it already."""
    info = info or reader.row(row_id)
    if info["status_name"] != "OK":
        raise ValueError(
            f"row {row_id} has no map: status {info['status_name']} ({info['error']})"
        )
    image = reader.original_image(row_id, manifest=manifest)
    m = reader.maps([row_id], method=method)[0]
    return overlay_image(image, m, info["crop_box"], alpha=alpha, cmap=cmap)

def write_overlays(
    reader: StoreReader,
    row_ids: Iterable[int],
    out_dir: str | Path,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    manifest: str | None = None,
    class_names: list[str] | None = None,
    method: str | None = None,
) -> list[Path]:
    """Write ``<row id>_<file stem>.png`` overlays; rows without a map are skipped.

    The file's stem makes the PNG findable next to the photo it came from; the class
    name stands in for photos with no file name (inline bytes). A ``method`` other than
    the store's primary one is added to the name (``<row id>_<stem>_gradcam.png``), so
    the overlays of two methods can share a folder.
    """
    suffix = "" if method in (None, reader.primary) else f"_{safe_name(method)}"
    reader.maps_path(method)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in reader.check_rows(row_ids):
        info = reader.row(r)
        if info["status_name"] != "OK":
            continue
        img = row_overlay(reader, r, alpha=alpha, cmap=cmap, manifest=manifest, method=method,
                          info=info)
        c = info.get("target", -1)
        stem = PurePosixPath(info["uri"]).stem if info["uri"] else ""
        if not stem and class_names and 0 <= c < len(class_names):
            stem = class_names[c]
        tag = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in stem).strip("_")
        p = out / (f"{r:07d}_{tag[:60]}{suffix}.png" if tag else f"{r:07d}{suffix}.png")
        img.save(p, format="PNG")
        paths.append(p)
    return paths
