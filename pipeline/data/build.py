"""Building manifests: from an image folder, ImageNet's validation layout, or a list file.

Every builder ends in :func:`write_manifest`, which writes one Parquet row group per unit
(``unit_size`` rows) with the ``unioncam.*`` key-value metadata :class:`Manifest` reads.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.classes import ClassList, label_of, load_class_list
from pipeline.data.decode import DecodeError, read_bytes
from pipeline.data.lists import list_file_entries
from pipeline.data.location import (
    SCHEME_RE,
    is_local,
    join_location,
    normalise_location,
    parent_location,
    redact_uri,
    resolve_uri,
    url_to_fs,
)
from pipeline.data.manifest import (
    DEFAULT_UNIT_SIZE,
    FORMAT,
    IMAGE_EXTENSIONS,
    META_BUILDER,
    META_CLASS_NAMES,
    META_CLASSES,
    META_FORMAT,
    META_SOURCE,
    META_UNIT,
    Manifest,
    ManifestError,
    manifest_schema,
    read_text,
)

__all__ = ["build_from_folder", "build_from_imagenet_val", "build_from_list", "list_files",
           "write_manifest"]  # fmt: skip

log = logging.getLogger(__name__)


def _relative_to(target: str, base_dir: str) -> str:
    """Express ``target`` relative to ``base_dir`` (same filesystem), for portable manifests."""
    if is_local(target) and is_local(base_dir):
        return os.path.relpath(target, base_dir)
    mt, mb = SCHEME_RE.match(target), SCHEME_RE.match(base_dir)
    if mt and mb and mt.group(1) == mb.group(1):
        t_path, b_path = target[mt.end() :], base_dir[mb.end() :].rstrip("/")
        if t_path.split("/", 1)[0] == b_path.split("/", 1)[0]:  # same bucket
            return posixpath.relpath(t_path, b_path)
    raise ManifestError(
        f"cannot store {redact_uri(target)} relative to the manifest folder "
        f"{redact_uri(base_dir)} (another filesystem or bucket); build with relative=False"
    )


def list_files(root: str, storage_options: dict[str, Any] | None) -> list[str]:
    """All files below ``root`` as '/'-separated paths relative to it, sorted."""
    if is_local(root):
        if not os.path.isdir(root):
            raise ManifestError(f"image folder {root}: no such directory")
        out = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, root)
            for name in filenames:
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                out.append(rel.replace(os.sep, "/"))
        return sorted(out)
    fs, path = url_to_fs(root, storage_options)
    path = path.rstrip("/")
    try:
        found = fs.find(path)
    except FileNotFoundError:
        found = []
    if not found:
        raise ManifestError(f"image folder {redact_uri(root)}: no such folder or it is empty")
    prefix = path + "/"
    return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))


def _is_image_name(rel: str, extensions: Iterable[str]) -> bool:
    parts = rel.split("/")
    if any(p.startswith(".") for p in parts):
        return False
    return os.path.splitext(parts[-1])[1].lower() in extensions


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def write_manifest(
    entries: Iterable[tuple[Any, ...]],
    out: str | os.PathLike[str],
    *,
    inline: bool = False,
    unit_size: int = DEFAULT_UNIT_SIZE,
    storage_options: dict[str, Any] | None = None,
    relative: bool = False,
    classes: ClassList | None = None,
    source: str | None = None,
    builder: str = "write_manifest",
    read_threads: int = 16,
    extra_fields: Sequence[pa.Field] = (),
    metadata: dict[bytes, bytes] | None = None,
) -> Manifest:
    """Write ``(uri, label)`` entries as a manifest; the building block of every builder.

    ``uri`` must be absolute (a path or a URL); with ``relative=True`` it is stored relative
    to the manifest's folder (so dataset + manifest can be moved together). With ``inline``
    the bytes are read (``read_threads`` at a time) and stored in the ``image`` column; an
    unreadable file keeps its ``uri`` and a null ``image`` (the run then reports it per row).
    Written one unit at a time, so memory stays bounded by one unit's bytes; a local file is
    written under a temporary name and renamed, so a crash never leaves half a manifest.
    ``extra_fields``: more columns, their values after ``(uri, label)`` in each entry (a
    ``shard`` column is stored relative like ``uri``); ``metadata``: more key-values.
    """
    if not isinstance(unit_size, int) or unit_size < 1:
        raise ManifestError(f"unit_size must be a positive integer, got {unit_size!r}")
    out_loc = normalise_location(out)
    if is_local(out_loc) and os.path.isdir(out_loc):
        raise ManifestError(f"manifest {out_loc}: is a directory (give the .parquet file to write)")
    out_dir = parent_location(out_loc)
    schema = pa.schema(list(manifest_schema(inline)) + list(extra_fields))
    meta = dict(metadata or {}) | {
        META_FORMAT: FORMAT.encode(),
        META_UNIT: str(unit_size).encode(),
        META_BUILDER: builder.encode(),
    }
    if source is not None:
        meta[META_SOURCE] = redact_uri(source).encode()
    if classes is not None:
        meta[META_CLASSES] = json.dumps(list(classes.synsets)).encode()
        if classes.names is not None:
            meta[META_CLASS_NAMES] = json.dumps(list(classes.names)).encode()
    schema = schema.with_metadata(meta)

    def chunks() -> Iterator[list[tuple[Any, ...]]]:
        buf: list[tuple[Any, ...]] = []
        for entry in entries:
            buf.append(entry)
            if len(buf) == unit_size:
                yield buf
                buf = []
        if buf:
            yield buf

    pool = ThreadPoolExecutor(max_workers=read_threads) if inline else None

    def fetch(uri: str | None) -> bytes | None:
        if uri is None:
            return None
        try:
            return read_bytes(uri, storage_options)
        except DecodeError as exc:
            log.warning("manifest: not inlining %s", exc.message)
            return None

    def stored(locs: list[str | None]) -> list[str | None]:
        return [_relative_to(u, out_dir) if relative and u else u for u in locs]

    def write_all(sink: Any) -> int:
        n = 0
        writer = pq.ParquetWriter(
            sink,
            schema,
            compression="zstd",
            write_statistics=["row_id", "uri", "label"],
            use_dictionary=["label"],
        )
        try:
            for chunk in chunks():
                uris = [e[0] for e in chunk]
                cols: dict[str, Any] = {
                    "row_id": pa.array(np.arange(n, n + len(chunk), dtype=np.int64)),
                    "uri": pa.array(stored(uris), pa.string()),
                    "label": pa.array([e[1] for e in chunk], pa.int32()),
                }
                for j, f in enumerate(extra_fields, start=2):
                    vals = [e[j] for e in chunk]
                    cols[f.name] = pa.array(stored(vals) if f.name == "shard" else vals, f.type)
                if inline:
                    assert pool is not None
                    cols["image"] = pa.array(list(pool.map(fetch, uris)), pa.binary())
                writer.write_table(pa.table(cols, schema=schema), row_group_size=unit_size)
                n += len(chunk)
        finally:
            writer.close()
        return n

    try:
        if is_local(out_loc):
            os.makedirs(out_dir, exist_ok=True)
            tmp = f"{out_loc}.tmp-{os.getpid()}"
            try:
                n = write_all(tmp)
                if n == 0:
                    raise ManifestError(f"manifest {out_loc}: no images to write")
                os.replace(tmp, out_loc)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            fs, path = url_to_fs(out_loc, storage_options)
            with fs.open(path, "wb") as fh:
                n = write_all(fh)
            if n == 0:
                fs.rm(path)
                raise ManifestError(f"manifest {redact_uri(out_loc)}: no images to write")
    finally:
        if pool is not None:
            pool.shutdown()
    return Manifest.open(out_loc, storage_options=storage_options)


def build_from_folder(
    image_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layout: str = "auto",
    class_list: str | os.PathLike[str] | Sequence[str] | ClassList | None = None,
    inline: bool = False,
    unit_size: int = DEFAULT_UNIT_SIZE,
    storage_options: dict[str, Any] | None = None,
    relative: bool = False,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> Manifest:
    """Manifest of an image folder (local or ``s3://``/``gs://``).

    ``layout="classes"`` is ImageNet's train layout: one subfolder per class (synset), images
    at any depth below it; the label is the subfolder's index in ``class_list`` when given
    (a subfolder missing from it is an error), else its index in sorted order (torchvision's
    ``ImageFolder`` convention). ``layout="flat"``: the images directly in ``image_dir``,
    no labels. ``"auto"`` picks whichever of the two the folder holds (both -> error).
    Rows are in sorted path order. Hidden files/folders and non-image extensions are skipped.
    """
    if layout not in ("auto", "classes", "flat"):
        raise ManifestError(f"layout must be 'auto', 'classes' or 'flat', got {layout!r}")
    root = normalise_location(image_dir)
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    files = [f for f in list_files(root, storage_options) if _is_image_name(f, exts)]
    top = [f for f in files if "/" not in f]
    nested = [f for f in files if "/" in f]
    if layout == "auto":
        if top and nested:
            raise ManifestError(
                f"image folder {redact_uri(root)} has images both at its top level "
                f"({len(top)}) and in subfolders ({len(nested)}); pass layout='classes' "
                "(top-level images ignored) or layout='flat' (subfolders ignored)"
            )
        layout = "classes" if nested else "flat"
    chosen = nested if layout == "classes" else top
    if not chosen:
        raise ManifestError(
            f"image folder {redact_uri(root)}: no images for layout={layout!r} "
            f"(extensions {sorted(exts)})"
        )
    classes: ClassList | None = None
    entries: list[tuple[str | None, int | None]]
    if layout == "classes":
        folders = sorted({f.split("/", 1)[0] for f in chosen})
        if class_list is not None:
            classes = load_class_list(class_list, storage_options)
            index = classes.index()
            unknown = [d for d in folders if d not in index]
            if unknown:
                raise ManifestError(
                    f"image folder {redact_uri(root)}: subfolder {unknown[0]!r} is not in the "
                    f"class list ({len(unknown)} unknown subfolders)"
                )
        else:
            classes = ClassList(tuple(folders))
            index = classes.index()
        entries = [(join_location(root, f), index[f.split("/", 1)[0]]) for f in chosen]
    else:
        classes = load_class_list(class_list, storage_options) if class_list is not None else None
        entries = [(join_location(root, f), None) for f in chosen]
    return write_manifest(
        entries,
        out,
        inline=inline,
        unit_size=unit_size,
        storage_options=storage_options,
        relative=relative,
        classes=classes,
        source=root,
        builder=f"build_from_folder(layout={layout})",
    )


_GT_FILE_COLS = ("file", "filename", "file_name", "image", "imageid", "image_id", "path", "uri")
_GT_LABEL_COLS = ("label", "class_index", "class", "synset", "wnid", "predictionstring")


def build_from_imagenet_val(
    image_dir: str | os.PathLike[str],
    ground_truth: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    class_list: str | os.PathLike[str] | Sequence[str] | ClassList | None = None,
    inline: bool = False,
    unit_size: int = DEFAULT_UNIT_SIZE,
    storage_options: dict[str, Any] | None = None,
    relative: bool = False,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> Manifest:
    """Manifest of ImageNet's validation set: a flat folder plus a ground-truth file.

    ``ground_truth`` is either one label per line in sorted file-name order, or
    ``file,label`` lines / a CSV with a header (file column: file/filename/ImageId/...,
    label column: label/class_index/synset/PredictionString; ``ImageId`` may omit the
    extension as in Kaggle's ``LOC_val_solution.csv``). Labels are 0-based class indices
    or synsets (then ``class_list`` maps them). The devkit's 1-based
    ``ILSVRC2012_validation_ground_truth.txt`` is refused with an explanation: its IDs follow
    the devkit's own class order, not the sorted-synset order models are trained with.
    """
    root = normalise_location(image_dir)
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    files = [
        f for f in list_files(root, storage_options) if "/" not in f and _is_image_name(f, exts)
    ]
    if not files:
        raise ManifestError(f"image folder {redact_uri(root)}: no images at its top level")
    classes = load_class_list(class_list, storage_options) if class_list is not None else None
    gt_uri = normalise_location(ground_truth)
    gt_name = redact_uri(gt_uri)
    text = read_text(gt_uri, storage_options)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise ManifestError(f"ground truth {gt_name}: empty")

    def tokens(line: str) -> list[str]:
        return [t for t in re.split(r"[,\s]+", line) if t] if "," not in line else line.split(",")

    first = tokens(lines[0])
    labels: list[int | None]
    if len(first) == 1:  # one label per line, in sorted file order
        if len(lines) != len(files):
            raise ManifestError(
                f"ground truth {gt_name} has {len(lines)} labels but {redact_uri(root)} holds "
                f"{len(files)} images (one label per line, in sorted file-name order)"
            )
        labels = [label_of(ln, classes, f"ground truth {gt_name} line {i + 1}")
                  for i, ln in enumerate(lines)]  # fmt: skip
        ints = [v for v in labels if v is not None]
        if ints and min(ints) == 1 and max(ints) == 1000 and 0 not in ints:
            raise ManifestError(
                f"ground truth {gt_name} looks like the devkit's 1-based ILSVRC2012 IDs "
                "(1..1000, devkit class order, not sorted synsets); convert them to synsets "
                "with the devkit's meta.mat or use a file,synset list with class_list="
            )
    else:
        start = 0
        head = [t.strip().lower() for t in first]
        file_col, label_col = 0, 1
        if any(h in _GT_FILE_COLS for h in head) or any(h in _GT_LABEL_COLS for h in head):
            start = 1
            file_col = next((i for i, h in enumerate(head) if h in _GT_FILE_COLS), 0)
            label_col = next((i for i, h in enumerate(head) if h in _GT_LABEL_COLS), 1)
        by_name: dict[str, str] = {}
        for i, line in enumerate(lines[start:], start=start + 1):
            parts = tokens(line)
            if len(parts) <= max(file_col, label_col):
                raise ManifestError(f"ground truth {gt_name} line {i}: expected file,label")
            name = posixpath.basename(parts[file_col].strip().replace("\\", "/"))
            label_token = parts[label_col].strip().split()
            by_name[name] = label_token[0] if label_token else ""
        labels = []
        for f in files:
            token = by_name.get(f)
            if token is None:
                token = by_name.get(os.path.splitext(f)[0])
            if token is None:
                missing = sum(
                    1 for g in files if g not in by_name and os.path.splitext(g)[0] not in by_name
                )
                raise ManifestError(
                    f"ground truth {gt_name} has no label for image {f!r} "
                    f"({missing} of {len(files)} images unlabelled)"
                )
            labels.append(label_of(token, classes, f"ground truth {gt_name} entry {f!r}"))
    entries = [(join_location(root, f), lab) for f, lab in zip(files, labels, strict=True)]
    return write_manifest(
        entries,
        out,
        inline=inline,
        unit_size=unit_size,
        storage_options=storage_options,
        relative=relative,
        classes=classes,
        source=root,
        builder="build_from_imagenet_val",
    )


def build_from_list(
    source: str | os.PathLike[str] | Sequence[str | tuple[str, int | str | None]],
    out: str | os.PathLike[str],
    *,
    class_list: str | os.PathLike[str] | Sequence[str] | ClassList | None = None,
    inline: bool = False,
    unit_size: int = DEFAULT_UNIT_SIZE,
    storage_options: dict[str, Any] | None = None,
    relative: bool = False,
    base_dir: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Manifest from an explicit list, in the given order.

    ``source``: a CSV with a header (a ``uri``/``path``/``file`` column and an optional
    ``label`` column, integer or synset), a text file with ``uri [label]`` per line, or an
    in-memory sequence of URIs or ``(uri, label)`` pairs. Relative entries are taken
    relative to ``base_dir`` (default: the list file's folder, or the working directory for
    in-memory lists) and stored absolute unless ``relative=True``.
    """
    classes = load_class_list(class_list, storage_options) if class_list is not None else None
    # Entries stream from the list into the writer, one unit at a time: ImageNet train's
    # 1.28 M lines held as lists of strings and tuples cost ~1 GB of RSS; streamed, the
    # builder holds the list's text and one unit.
    if isinstance(source, (str, os.PathLike)):
        src = normalise_location(source)
        name = redact_uri(src)
        default_base = parent_location(src)
        raw = list_file_entries(read_text(src, storage_options), name)
    else:
        name = "list"
        default_base = os.getcwd()
        raw = ((os.fspath(item), None) if isinstance(item, (str, os.PathLike))
               else (os.fspath(item[0]), item[1]) for item in source)  # fmt: skip
    base = normalise_location(base_dir) if base_dir is not None else default_base

    def entries() -> Iterator[tuple[str | None, int | None]]:
        i = -1
        for i, (uri, lab) in enumerate(raw):
            where = f"{name} entry {i + 1}"
            uri = uri.strip()
            if not uri:
                raise ManifestError(f"{where}: empty uri")
            label = None if lab is None else label_of(str(lab), classes, where)
            yield resolve_uri(uri, base), label
        if i < 0:
            raise ManifestError(f"{name}: no entries")

    return write_manifest(
        entries(),
        out,
        inline=inline,
        unit_size=unit_size,
        storage_options=storage_options,
        relative=relative,
        classes=classes,
        source=name if name != "list" else None,
        builder="build_from_list",
    )


