"""Dataset manifests: one Parquet file that lists every image, one row group per unit of work.

Why Parquet with one row group per unit: a worker that processes unit ``u`` reads exactly
row group ``u`` (a few tens of kB for 1024 URIs) instead of the whole 1.28M-row manifest, and
the row group boundaries *are* the unit boundaries, so the manifest, the Zarr shards and the
completion markers agree on what "unit 17" means without any extra bookkeeping.

Schema (extra columns are allowed and ignored):

========== ============ ==========================================================
column     type         meaning
========== ============ ==========================================================
row_id     int64        0..N-1, unique, contiguous, in file order (the Zarr index)
uri        string       local path, ``file://``, ``s3://``, ``gs://`` ... or a path
                        relative to the manifest's folder; null only if ``image``
label      int32, null  ground-truth class index (>= 0), null when unknown
image      binary, opt. the encoded image bytes inline (then ``uri`` is provenance)
========== ============ ==========================================================

Every row group but the last holds exactly ``unit_size`` rows. :meth:`Manifest.open`
checks all of this up front and raises one :class:`ManifestError` line, so a bad manifest
fails before a cluster is started, not in unit 812 after an hour.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .decode import DecodeError, is_local, local_path, read_bytes, redact_uri

__all__ = [
    "DEFAULT_UNIT_SIZE",
    "IMAGE_EXTENSIONS",
    "ClassList",
    "Manifest",
    "ManifestError",
    "Row",
    "build_from_folder",
    "build_from_imagenet_val",
    "build_from_list",
    "load_class_list",
    "manifest_schema",
    "write_manifest",
]

log = logging.getLogger(__name__)

DEFAULT_UNIT_SIZE = 1024
FORMAT = "unioncam-manifest-1"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
     ".pgm", ".pbm", ".jp2", ".j2k", ".avif", ".ico"}
)  # fmt: skip

_META_FORMAT = b"unioncam.format"
_META_UNIT = b"unioncam.unit_size"
_META_CLASSES = b"unioncam.classes"
_META_CLASS_NAMES = b"unioncam.class_names"
_META_SOURCE = b"unioncam.source"
_META_BUILDER = b"unioncam.builder"

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class ManifestError(ValueError):
    """A manifest (or a builder input) is unusable; the message is one line naming it."""


@dataclass(frozen=True, slots=True)
class Row:
    """One image of a unit. ``uri`` is resolved (absolute path or full URL) or None."""

    row_id: int
    uri: str | None
    label: int | None
    data: bytes | None = None


@dataclass(frozen=True)
class ClassList:
    """Class index -> synset (and optional human name), e.g. ImageNet's 1000 classes."""

    synsets: tuple[str, ...]
    names: tuple[str, ...] | None = None

    def index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.synsets)}

    def __len__(self) -> int:
        return len(self.synsets)


def manifest_schema(inline: bool = False) -> pa.Schema:
    """The schema builders write (``image`` only when bytes are inlined)."""
    fields = [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("label", pa.int32()),
    ]
    if inline:
        fields.append(pa.field("image", pa.binary()))
    return pa.schema(fields)


# ---------------------------------------------------------------------------------------------
# Locations: local paths and fsspec URLs
# ---------------------------------------------------------------------------------------------
def _normalise_location(uri: str | os.PathLike[str]) -> str:
    """Absolute local path (``file://`` stripped) or the URL unchanged (minus trailing /)."""
    uri = os.fspath(uri)
    if is_local(uri):
        return os.path.abspath(local_path(uri))
    return uri.rstrip("/")


def _fs(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def _parent(location: str) -> str:
    if is_local(location):
        return os.path.dirname(location)
    m = _SCHEME_RE.match(location)
    assert m is not None
    head, rest = location[: m.end()], location[m.end() :]
    return head + posixpath.dirname(rest)


def _join(base: str, rel: str) -> str:
    """``rel`` relative to directory ``base`` (local dir or URL), normalised."""
    if is_local(base):
        return os.path.normpath(os.path.join(base, rel))
    m = _SCHEME_RE.match(base)
    assert m is not None
    head, rest = base[: m.end()], base[m.end() :]
    return head + posixpath.normpath(posixpath.join(rest, rel))


def _resolve(uri: str | None, base: str) -> str | None:
    """A stored uri -> what read_bytes needs: absolute path or full URL."""
    if uri is None:
        return None
    if _SCHEME_RE.match(uri):
        return os.path.normpath(local_path(uri)) if is_local(uri) else uri
    if uri.startswith("~"):
        return os.path.expanduser(uri)
    if os.path.isabs(uri):
        return os.path.normpath(uri)
    return _join(base, uri)


def _relative_to(target: str, base_dir: str) -> str:
    """Express ``target`` relative to ``base_dir`` (same filesystem), for portable manifests."""
    if is_local(target) and is_local(base_dir):
        return os.path.relpath(target, base_dir)
    mt, mb = _SCHEME_RE.match(target), _SCHEME_RE.match(base_dir)
    if mt and mb and mt.group(1) == mb.group(1):
        t_path, b_path = target[mt.end() :], base_dir[mb.end() :].rstrip("/")
        if t_path.split("/", 1)[0] == b_path.split("/", 1)[0]:  # same bucket
            return posixpath.relpath(t_path, b_path)
    raise ManifestError(
        f"cannot store {redact_uri(target)} relative to the manifest folder "
        f"{redact_uri(base_dir)} (another filesystem or bucket); build with relative=False"
    )


def _read_text(uri: str, storage_options: dict[str, Any] | None) -> str:
    try:
        data = read_bytes(uri, storage_options)
    except DecodeError as exc:
        raise ManifestError(exc.message) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"{redact_uri(uri)}: not a UTF-8 text file") from None


def _list_files(root: str, storage_options: dict[str, Any] | None) -> list[str]:
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
    fs, path = _fs(root, storage_options)
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
# Class lists
# ---------------------------------------------------------------------------------------------
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
        return _checked_classes(synsets, None, "class list")
    uri = os.fspath(source)
    text = _read_text(_normalise_location(uri), storage_options)
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
    return _checked_classes(synsets, names, f"class list {redact_uri(uri)}")


def _checked_classes(
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


def _label_of(token: str, classes: ClassList | None, where: str) -> int | None:
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


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def write_manifest(
    entries: Iterable[tuple[str | None, int | None]],
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
) -> Manifest:
    """Write ``(uri, label)`` entries as a manifest; the building block of every builder.

    ``uri`` must be absolute (a path or a URL); with ``relative=True`` it is stored relative
    to the manifest's folder (so dataset + manifest can be moved together). With ``inline``
    the bytes are read (``read_threads`` at a time) and stored in the ``image`` column; an
    unreadable file keeps its ``uri`` and a null ``image`` (the run then reports it per row).
    Written one unit at a time, so memory stays bounded by one unit's bytes; a local file is
    written under a temporary name and renamed, so a crash never leaves half a manifest.
    """
    if not isinstance(unit_size, int) or unit_size < 1:
        raise ManifestError(f"unit_size must be a positive integer, got {unit_size!r}")
    out_loc = _normalise_location(out)
    out_dir = _parent(out_loc)
    schema = manifest_schema(inline)
    meta = {
        _META_FORMAT: FORMAT.encode(),
        _META_UNIT: str(unit_size).encode(),
        _META_BUILDER: builder.encode(),
    }
    if source is not None:
        meta[_META_SOURCE] = redact_uri(source).encode()
    if classes is not None:
        meta[_META_CLASSES] = json.dumps(list(classes.synsets)).encode()
        if classes.names is not None:
            meta[_META_CLASS_NAMES] = json.dumps(list(classes.names)).encode()
    schema = schema.with_metadata(meta)

    def chunks() -> Iterator[list[tuple[str | None, int | None]]]:
        buf: list[tuple[str | None, int | None]] = []
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
                uris = [u for u, _ in chunk]
                stored = [
                    None if u is None else (_relative_to(u, out_dir) if relative else u)
                    for u in uris
                ]
                cols: dict[str, Any] = {
                    "row_id": pa.array(np.arange(n, n + len(chunk), dtype=np.int64)),
                    "uri": pa.array(stored, pa.string()),
                    "label": pa.array([lab for _, lab in chunk], pa.int32()),
                }
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
            fs, path = _fs(out_loc, storage_options)
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
    root = _normalise_location(image_dir)
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    files = [f for f in _list_files(root, storage_options) if _is_image_name(f, exts)]
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
        entries = [(_join(root, f), index[f.split("/", 1)[0]]) for f in chosen]
    else:
        classes = load_class_list(class_list, storage_options) if class_list is not None else None
        entries = [(_join(root, f), None) for f in chosen]
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
    root = _normalise_location(image_dir)
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    files = [
        f for f in _list_files(root, storage_options) if "/" not in f and _is_image_name(f, exts)
    ]
    if not files:
        raise ManifestError(f"image folder {redact_uri(root)}: no images at its top level")
    classes = load_class_list(class_list, storage_options) if class_list is not None else None
    gt_uri = _normalise_location(ground_truth)
    gt_name = redact_uri(gt_uri)
    text = _read_text(gt_uri, storage_options)
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
        labels = [_label_of(ln, classes, f"ground truth {gt_name} line {i + 1}")
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
            labels.append(_label_of(token, classes, f"ground truth {gt_name} entry {f!r}"))
    entries = [(_join(root, f), lab) for f, lab in zip(files, labels, strict=True)]
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


_LIST_URI_COLS = ("uri", "path", "file", "filename", "image", "url")
_LIST_LABEL_COLS = ("label", "class_index", "class", "synset", "target")


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
    raw: list[tuple[str, int | str | None]] = []
    if isinstance(source, (str, os.PathLike)):
        src = _normalise_location(source)
        name = redact_uri(src)
        default_base = _parent(src)
        text = _read_text(src, storage_options)
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            raise ManifestError(f"list {name}: empty")
        header = {h.strip().lower() for h in lines[0].split(",")}
        if src.lower().endswith(".csv") or header & set(_LIST_URI_COLS):
            reader = csv.DictReader(io.StringIO("\n".join(lines)))
            cols = {c.strip().lower(): c for c in reader.fieldnames or []}
            uri_col = next((cols[c] for c in _LIST_URI_COLS if c in cols), None)
            lab_col = next((cols[c] for c in _LIST_LABEL_COLS if c in cols), None)
            if uri_col is None:
                raise ManifestError(
                    f"list {name}: no 'uri' (or path/file) column in header {reader.fieldnames}"
                )
            for rec in reader:
                raw.append((rec[uri_col] or "", rec[lab_col] if lab_col else None))
        else:
            for line in lines:
                parts = line.strip().rsplit(None, 1)
                if len(parts) == 2 and re.fullmatch(r"[+-]?\d+|n\d{8}", parts[1]):
                    raw.append((parts[0], parts[1]))
                else:
                    raw.append((line.strip(), None))
    else:
        name = "list"
        default_base = os.getcwd()
        for item in source:
            if isinstance(item, (str, os.PathLike)):
                raw.append((os.fspath(item), None))
            else:
                uri, lab = item
                raw.append((os.fspath(uri), lab))
    base = _normalise_location(base_dir) if base_dir is not None else default_base
    entries: list[tuple[str | None, int | None]] = []
    for i, (uri, lab) in enumerate(raw):
        where = f"{name} entry {i + 1}"
        uri = uri.strip()
        if not uri:
            raise ManifestError(f"{where}: empty uri")
        if isinstance(lab, int):
            label = _label_of(str(lab), classes, where)
        elif lab is None:
            label = None
        else:
            label = _label_of(str(lab), classes, where)
        entries.append((_resolve(uri, base), label))
    if not entries:
        raise ManifestError(f"{name}: no entries")
    return write_manifest(
        entries,
        out,
        inline=inline,
        unit_size=unit_size,
        storage_options=storage_options,
        relative=relative,
        classes=classes,
        source=name if name != "list" else None,
        builder="build_from_list",
    )


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


class Manifest:
    """An opened, validated manifest. Cheap to pickle (to Ray actors): the file handle is
    dropped and reopened lazily. ``read_unit`` is thread-safe (reads are serialised)."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None,
        parquet: pq.ParquetFile,
        handle: Any,
    ) -> None:
        self._uri = uri
        self._storage_options = storage_options
        self._pf: pq.ParquetFile | None = parquet
        self._handle = handle
        self._lock = threading.Lock()
        self._fingerprint: str | None = None
        md = parquet.metadata
        self._num_rows = int(md.num_rows)
        self._group_rows = [int(md.row_group(i).num_rows) for i in range(md.num_row_groups)]
        schema = parquet.schema_arrow
        self._columns = set(schema.names)
        kv = schema.metadata or {}
        self._kv = {
            k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in kv.items()
        }
        self._unit_size = self._group_rows[0] if self._group_rows else 0
        self._has_labels: bool | None = None
        self._base = _parent(uri)

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        uri: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        validate: bool = True,
    ) -> Manifest:
        """Open and validate; raise one :class:`ManifestError` line if anything is off.

        Schema, row-group sizes and ``uri``-or-``image`` presence are checked from the
        footer; with ``validate`` (default) the ``row_id`` and ``label`` columns are read once
        (a few MB for ImageNet) to prove ids are exactly 0..N-1 and labels non-negative.
        Workers that reopen an already validated manifest may pass ``validate=False``.
        """
        loc = _normalise_location(uri)
        parquet, handle = cls._open_parquet(loc, storage_options)
        m = cls(loc, storage_options, parquet, handle)
        m._check_structure()
        if validate:
            m._check_contents()
        return m

    @staticmethod
    def _open_parquet(
        loc: str, storage_options: dict[str, Any] | None
    ) -> tuple[pq.ParquetFile, Any]:
        name = redact_uri(loc)
        handle = None
        try:
            if is_local(loc):
                if not os.path.isfile(loc):
                    raise ManifestError(f"manifest {name}: no such file")
                return pq.ParquetFile(loc), None
            fs, path = _fs(loc, storage_options)
            handle = fs.open(path, "rb", block_size=4 * 2**20)
            return pq.ParquetFile(handle), handle
        except ManifestError:
            raise
        except FileNotFoundError:
            raise ManifestError(f"manifest {name}: no such file") from None
        except (pa.ArrowInvalid, OSError) as exc:
            if handle is not None:
                handle.close()
            raise ManifestError(f"manifest {name}: not a readable Parquet file ({exc})") from None

    def _parquet(self) -> pq.ParquetFile:
        if self._pf is None:
            self._pf, self._handle = self._open_parquet(self._uri, self._storage_options)
        return self._pf

    def close(self) -> None:
        """Release the file handle (it is reopened on the next read)."""
        with self._lock:
            if self._handle is not None:
                self._handle.close()
            self._pf = None
            self._handle = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pf"] = None
        state["_handle"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Manifest({redact_uri(self._uri)!r}, rows={self._num_rows}, "
            f"units={self.num_units}, unit_size={self._unit_size})"
        )

    # -- validation ---------------------------------------------------------------------
    def _fail(self, what: str) -> ManifestError:
        return ManifestError(f"manifest {redact_uri(self._uri)}: {what}")

    def _check_structure(self) -> None:
        pf = self._parquet()
        schema = pf.schema_arrow
        if "row_id" not in schema.names:
            raise self._fail(f"no 'row_id' column (columns: {schema.names})")
        if not pa.types.is_integer(schema.field("row_id").type):
            raise self._fail(f"column 'row_id' must be int64, is {schema.field('row_id').type}")
        if "uri" not in schema.names:
            raise self._fail(f"no 'uri' column (columns: {schema.names})")
        if not _is_string(schema.field("uri").type):
            raise self._fail(f"column 'uri' must be string, is {schema.field('uri').type}")
        if "label" in schema.names and not pa.types.is_integer(schema.field("label").type):
            raise self._fail(f"column 'label' must be int32, is {schema.field('label').type}")
        if "image" in schema.names and not _is_binary(schema.field("image").type):
            raise self._fail(f"column 'image' must be binary, is {schema.field('image').type}")
        if self._num_rows == 0:
            raise self._fail("no rows")
        sizes = self._group_rows
        declared = self._kv.get(_META_UNIT.decode())
        unit = sizes[0]
        if declared is not None and declared.isdigit() and int(declared) != unit and len(sizes) > 1:
            raise self._fail(
                f"row group 0 has {unit} rows but the manifest declares unit_size={declared}"
            )
        if declared is not None and declared.isdigit() and len(sizes) == 1:
            unit = max(int(declared), sizes[0])
        for i, n in enumerate(sizes[:-1]):
            if n != unit:
                raise self._fail(
                    f"row group {i} has {n} rows, expected {unit} (unit_size): every row group "
                    "but the last must hold exactly unit_size rows; rebuild the manifest with "
                    "`unioncam manifest` or write it with row_group_size=unit_size"
                )
        if not 0 < sizes[-1] <= unit:
            raise self._fail(f"last row group has {sizes[-1]} rows, expected 1..{unit}")
        self._unit_size = unit
        # uri-or-image, from the footer's null counts (no data read unless needed).
        uri_idx = schema.get_field_index("uri")
        has_image = "image" in schema.names
        md = pf.metadata
        for g in range(md.num_row_groups):
            stats = md.row_group(g).column(uri_idx).statistics
            nulls = stats.null_count if stats is not None and stats.has_null_count else None
            if nulls == 0:
                continue
            cols = ["row_id", "uri"] + (["image"] if has_image else [])
            with self._lock:
                t = pf.read_row_group(g, columns=cols)
            missing = t["uri"].is_null()
            if has_image:
                missing = pc.and_(missing, t["image"].is_null())
            bad = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
            if bad.size:
                rid = t["row_id"][int(bad[0])].as_py()
                need = "a uri or inline image bytes" if has_image else "a uri"
                raise self._fail(f"row_id {rid} has no {need} ({bad.size} such rows in unit {g})")

    def _check_contents(self) -> None:
        pf = self._parquet()
        cols = ["row_id"] + (["label"] if "label" in self._columns else [])
        with self._lock:
            t = pf.read(columns=cols)
        ids = t["row_id"].to_numpy(zero_copy_only=False)
        if t["row_id"].null_count:
            raise self._fail("column 'row_id' has nulls")
        expected = np.arange(len(ids), dtype=np.int64)
        if not np.array_equal(ids, expected):
            pos = int(np.flatnonzero(ids != expected)[0])
            raise self._fail(
                f"row_id at position {pos} is {int(ids[pos])}, expected {pos} "
                "(row ids must be 0..N-1, unique, in order)"
            )
        if "label" in cols:
            labels = t["label"]
            self._has_labels = labels.null_count < len(labels)
            if self._has_labels:
                arr = labels.to_numpy(zero_copy_only=False)
                neg = np.flatnonzero(np.nan_to_num(arr.astype(np.float64), nan=0.0) < 0)
                if neg.size:
                    p = int(neg[0])
                    raise self._fail(
                        f"row_id {p} has negative label {int(arr[p])} (use null for no label)"
                    )
        else:
            self._has_labels = False

    # -- properties ------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        """Absolute path or URL of the manifest file."""
        return self._uri

    @property
    def storage_options(self) -> dict[str, Any] | None:
        return self._storage_options

    @property
    def num_rows(self) -> int:
        return self._num_rows

    @property
    def num_units(self) -> int:
        return len(self._group_rows)

    @property
    def unit_size(self) -> int:
        return self._unit_size

    @property
    def has_images(self) -> bool:
        """True when the manifest carries inline image bytes."""
        return "image" in self._columns

    @property
    def has_labels(self) -> bool:
        """True when at least one row has a label."""
        if self._has_labels is None:
            if "label" not in self._columns:
                self._has_labels = False
            else:
                with self._lock:
                    col = self._parquet().read(columns=["label"])["label"]
                self._has_labels = col.null_count < len(col)
        return self._has_labels

    @property
    def classes(self) -> list[str] | None:
        """Class index -> synset/folder name, when the builder knew it."""
        raw = self._kv.get(_META_CLASSES.decode())
        return list(json.loads(raw)) if raw else None

    @property
    def class_names(self) -> list[str] | None:
        """Class index -> human-readable name, when the class list had names."""
        raw = self._kv.get(_META_CLASS_NAMES.decode())
        return list(json.loads(raw)) if raw else None

    @property
    def metadata(self) -> dict[str, str]:
        """The ``unioncam.*`` key-value metadata written by the builder."""
        return {k: v for k, v in self._kv.items() if k.startswith("unioncam.")}

    # -- units ---------------------------------------------------------------------------
    def unit_range(self, u: int) -> tuple[int, int]:
        """Row ids ``[start, stop)`` of unit ``u``."""
        if not 0 <= u < self.num_units:
            raise IndexError(
                f"unit {u} out of range: manifest {redact_uri(self._uri)} has "
                f"{self.num_units} units (0..{self.num_units - 1})"
            )
        start = u * self._unit_size
        return start, start + self._group_rows[u]

    def unit_of(self, row_id: int) -> int:
        """The unit that holds ``row_id``."""
        if not 0 <= row_id < self._num_rows:
            raise IndexError(f"row_id {row_id} out of range 0..{self._num_rows - 1}")
        return row_id // self._unit_size

    def read_unit(self, u: int, *, with_images: bool = True) -> list[Row]:
        """The rows of unit ``u`` (one Parquet row group read; URIs resolved)."""
        start, stop = self.unit_range(u)
        cols = ["row_id", "uri"]
        if "label" in self._columns:
            cols.append("label")
        if with_images and self.has_images:
            cols.append("image")
        with self._lock:
            t = self._parquet().read_row_group(u, columns=cols)
        ids = t["row_id"].to_numpy(zero_copy_only=False)
        if len(ids) != stop - start or ids[0] != start or ids[-1] != stop - 1:
            raise self._fail(
                f"unit {u} holds row ids {ids[0]}..{ids[-1]}, expected {start}..{stop - 1}"
            )
        uris = t["uri"].to_pylist()
        labels = t["label"].to_pylist() if "label" in cols else [None] * len(ids)
        datas = t["image"].to_pylist() if "image" in cols else [None] * len(ids)
        base = self._base
        return [
            Row(int(i), _resolve(uri, base), None if lab is None else int(lab), data)
            for i, uri, lab, data in zip(ids.tolist(), uris, labels, datas, strict=True)
        ]

    def get_rows(self, row_ids: Iterable[int], *, with_images: bool = True) -> list[Row]:
        """Rows by id (in the order given), reading only the units that hold them."""
        wanted = [int(r) for r in row_ids]
        by_unit: dict[int, dict[int, Row]] = {}
        for r in wanted:
            by_unit.setdefault(self.unit_of(r), {})
        for u in by_unit:
            by_unit[u] = {row.row_id: row for row in self.read_unit(u, with_images=with_images)}
        return [by_unit[self.unit_of(r)][r] for r in wanted]

    # -- identity ------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """SHA-256 of what the rows *are*: unit size, row ids, stored uris and labels.

        Independent of the file's location, compression and Parquet encoding (a copied or
        re-encoded manifest keeps it). Inline image bytes are not hashed (their ``uri`` is,
        and inlining does not change what is explained), so computing it reads only the
        small columns, in batches.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            has_label = "label" in self._columns
            h.update(
                f"{FORMAT};rows={self._num_rows};unit={self._unit_size};labels={has_label}\n".encode()
            )
            cols = ["row_id", "uri"] + (["label"] if has_label else [])
            with self._lock:  # streamed: memory stays at one batch
                for b in self._parquet().iter_batches(batch_size=1 << 16, columns=cols):
                    h.update(b["row_id"].to_numpy(zero_copy_only=False).astype("<i8").tobytes())
                    h.update(json.dumps(b["uri"].to_pylist()).encode())
                    if has_label:
                        lab = pc.fill_null(b["label"], -1).to_numpy(zero_copy_only=False)
                        h.update(lab.astype("<i8").tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint
