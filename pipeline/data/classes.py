"""Class lists: index -> synset (and name), from a file, a sequence, or the packaged ImageNet list.

Why explicit class lists: ImageNet label ``i`` means "the i-th synset in sorted order"; a
subset of the data (or a flat val folder) cannot rediscover that order by itself.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.location import normalise_location, redact_uri
from pipeline.data.manifest import ManifestError, read_text

__all__ = [
    "ClassList",
    "checked_classes",
    "class_name",
    "label_of",
    "load_class_list",
    "load_class_names",
]


@dataclass(frozen=True)
class ClassList:
    """Class index -> synset (and optional human name), e.g. ImageNet's 1000 classes."""

    synsets: tuple[str, ...]
    names: tuple[str, ...] | None = None

    def index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.synsets)}

    def __len__(self) -> int:
        return len(self.synsets)


def load_class_names() -> list[str]:
    """The 1000 ImageNet class names shipped with the package (index = class)."""
    path = Path(__file__).with_name("imagenet_classes.txt")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    names = []
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        _, _, name = ln.partition("\t")
        names.append(name or ln)
    return names


def class_name(names: Sequence[str], c: int) -> str:
    """The name of class ``c`` when ``names`` has it, else the index as text."""
    return names[c] if 0 <= c < len(names) else str(c)


def load_class_list(
    source: str | os.PathLike[str] | Sequence[str] | ClassList,
    storage_options: dict[str, Any] | None = None,
) -> ClassList:
    """Read a class list: a CSV (columns like ``class_index,synset,class_name``), a text file
    with one ``synset [name]`` per line (``#`` comments allowed; e.g. ImageNet's
    ``LOC_synset_mapping.txt``), or an in-memory sequence of synsets.

    Why explicit class lists: ImageNet label ``i`` means "the i-th synset in sorted order";
    a subset of the data (or a flat val folder) cannot rediscover that order by itself.
    """
    if isinstance(source, ClassList):
        return source
    if not isinstance(source, (str, os.PathLike)):
        synsets = tuple(str(s) for s in source)
        return checked_classes(synsets, None, "class list")
    uri = os.fspath(source)
    text = read_text(normalise_location(uri), storage_options)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ManifestError(f"class list {redact_uri(uri)}: no classes in it")
    header = {h.strip().lower() for h in lines[0].split(",")}
    if uri.lower().endswith(".csv") or header & {"synset", "wnid", "class_index", "class_name"}:
        reader = csv.DictReader(io.StringIO("\n".join(lines)))
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        syn_col = next((cols[c] for c in ("synset", "wnid", "folder", "class") if c in cols), None)
        idx_col = next(
            (cols[c] for c in ("class_index", "index", "idx", "label") if c in cols), None
        )
        name_col = next((cols[c] for c in ("class_name", "name", "names") if c in cols), None)
        if syn_col is None:
            raise ManifestError(
                f"class list {redact_uri(uri)}: no 'synset' column (found {reader.fieldnames})"
            )
        records = list(reader)
        if idx_col is not None:
            try:
                records.sort(key=lambda r: int(r[idx_col]))
                indices = [int(r[idx_col]) for r in records]
            except (TypeError, ValueError):
                raise ManifestError(
                    f"class list {redact_uri(uri)}: column {idx_col!r} is not all integers"
                ) from None
            if indices != list(range(len(records))):
                raise ManifestError(
                    f"class list {redact_uri(uri)}: column {idx_col!r} must be 0..{len(records) - 1}"
                )
        synsets = tuple(r[syn_col].strip() for r in records)
        names = tuple((r[name_col] or "").strip() for r in records) if name_col else None
    else:
        split = [ln.strip().split(None, 1) for ln in lines]
        synsets = tuple(p[0] for p in split)
        names = tuple(p[1].strip() if len(p) > 1 else "" for p in split)
        if not any(names):
            names = None
    return checked_classes(synsets, names, f"class list {redact_uri(uri)}")


def checked_classes(
    synsets: tuple[str, ...], names: tuple[str, ...] | None, what: str
) -> ClassList:
    seen: dict[str, int] = {}
    for i, s in enumerate(synsets):
        if not s:
            raise ManifestError(f"{what}: empty class name at index {i}")
        if s in seen:
            raise ManifestError(f"{what}: class {s!r} appears twice (indices {seen[s]} and {i})")
        seen[s] = i
    return ClassList(synsets, names)


def label_of(token: str, classes: ClassList | None, where: str) -> int | None:
    """An integer label or a synset (mapped through ``classes``); '' -> None."""
    token = token.strip()
    if token == "":
        return None
    if re.fullmatch(r"[+-]?\d+", token):
        value = int(token)
        if value < 0:
            raise ManifestError(f"{where}: negative label {value} (leave it empty for no label)")
        if classes is not None and value >= len(classes):
            raise ManifestError(f"{where}: label {value} >= number of classes {len(classes)}")
        return value
    if classes is None:
        raise ManifestError(
            f"{where}: label {token!r} is a class name; pass class_list= (e.g. "
            "imagenet_classes.csv) to map names to indices"
        )
    index = classes.index().get(token)
    if index is None:
        raise ManifestError(f"{where}: class {token!r} is not in the class list")
    return index


