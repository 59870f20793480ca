"""Lists of images a manifest is built from: a CSV with a header naming its uri (and label)
column, or ``uri [label]`` per line; read lazily so ImageNet train's 1.28 M lines stream
into the manifest writer instead of being held as lists (~1 GB of RSS before)."""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections.abc import Iterator

from pipeline.data.manifest import ManifestError

__all__ = ["list_file_entries"]

_LIST_URI_COLS = ("uri", "path", "file", "filename", "image", "url")
_LIST_LABEL_COLS = ("label", "class_index", "class", "synset", "target")


def list_file_entries(text: str, name: str) -> Iterator[tuple[str, str | None]]:
    """``(uri, label or None)`` of every entry of a list file's ``text``, lazily: a CSV with
    a header naming a uri column (and a label column), else ``uri [label]`` per line."""
    lines = (ln for ln in io.StringIO(text) if ln.strip() and not ln.lstrip().startswith("#"))
    first = next(lines, None)
    if first is None:
        raise ManifestError(f"list {name}: empty")
    header = {h.strip().lower() for h in first.split(",")}
    if name.lower().endswith(".csv") or header & set(_LIST_URI_COLS):
        reader = csv.DictReader(itertools.chain([first], lines))
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        uri_col = next((cols[c] for c in _LIST_URI_COLS if c in cols), None)
        lab_col = next((cols[c] for c in _LIST_LABEL_COLS if c in cols), None)
        if uri_col is None:
            raise ManifestError(
                f"list {name}: no 'uri' (or path/file) column in header {reader.fieldnames}"
            )
        for rec in reader:
            yield rec[uri_col] or "", (rec[lab_col] if lab_col else None)
        return
    for line in itertools.chain([first], lines):
        parts = line.strip().rsplit(None, 1)
        if len(parts) == 2 and re.fullmatch(r"[+-]?\d+|n\d{8}", parts[1]):
            yield parts[0], parts[1]
        else:
            yield line.strip(), None
