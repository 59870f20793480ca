"""Building manifests that point into shards: WebDataset tars and Hugging Face-style Parquet.

Why not copy: a dataset kept as shards would double its storage (and the time before
anything is explained) if it were unpacked into loose files or inlined into the manifest.
The manifest instead records where each image lives (the columns are described in
:mod:`pipeline.data.manifest`) and the worker reads it in place (:mod:`pipeline.data.shards`).

* WebDataset: one pass over each tar's headers; a sample is the members sharing a key
  (``dir/key.jpg`` + ``dir/key.cls``); its image member's ``(offset, length)`` is recorded,
  its label member (``.cls`` by default, an integer) is read during the pass.
* Parquet (the ``datasets`` layout: ``image: struct<bytes, path>`` + ``label``): only the
  footers and the label column are read; class names come from the ``huggingface`` schema
  metadata (a ``ClassLabel`` feature) when present.

Rows keep the shards' sorted order and each shard's own order; units still follow the
manifest's row groups, so a unit may span shards.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.build import list_files, write_manifest
from pipeline.data.classes import ClassList, label_of, load_class_list
from pipeline.data.location import (
    is_local,
    join_location,
    local_path,
    normalise_location,
    redact_uri,
    url_to_fs,
)
from pipeline.data.manifest import (
    DEFAULT_UNIT_SIZE,
    IMAGE_EXTENSIONS,
    META_IMAGE_COLUMN,
    Manifest,
    ManifestError,
)
from pipeline.data.shards import PARQUET, WEBDATASET

__all__ = ["build_from_parquet_shards", "build_from_shards", "build_from_webdataset",
           "detect_shards", "list_shards"]  # fmt: skip

log = logging.getLogger(__name__)

SUFFIXES = {WEBDATASET: ".tar", PARQUET: ".parquet"}
_IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}


def list_shards(source: str, kind: str, storage_options: dict[str, Any] | None = None
                ) -> list[str]:  # fmt: skip
    """The shard files of ``source`` (one file, or every ``.tar``/``.parquet`` below a
    folder or prefix), as absolute locations in sorted order."""
    root = normalise_location(source)
    suffix = SUFFIXES[kind]
    if root.lower().endswith(suffix):
        return [root]
    files = [f for f in list_files(root, storage_options) if f.lower().endswith(suffix)
             and not any(p.startswith(".") for p in f.split("/"))]  # fmt: skip
    if not files:
        raise ManifestError(f"{redact_uri(root)}: no {suffix} shards in it")
    return [join_location(root, f) for f in files]


def detect_shards(source: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """``"webdataset"`` or ``"parquet"`` when ``source`` is a shard or a folder of shards of
    one kind and no loose images; None otherwise (a folder of images, a list)."""
    root = normalise_location(source)
    for kind, suffix in SUFFIXES.items():
        if root.lower().endswith(suffix):
            return kind
    exts: set[str] = set()
    if is_local(root):  # walked lazily: a folder of loose images answers at its first image
        for _dir, dirs, names in os.walk(root, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            exts |= {os.path.splitext(n)[1].lower() for n in names if not n.startswith(".")}
            if exts & IMAGE_EXTENSIONS:
                return None
    else:  # shards sit at most a folder or two below the prefix (train/, val/)
        fs, path = url_to_fs(root, storage_options)
        try:
            exts = {os.path.splitext(f)[1].lower() for f in fs.find(path, maxdepth=3)}
        except (FileNotFoundError, OSError):
            return None
    kinds = [k for k, s in SUFFIXES.items() if s in exts]
    if len(kinds) == 1 and not exts & IMAGE_EXTENSIONS:
        return kinds[0]
    return None


def build_from_shards(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                      kind: str | None = None, label: str | None = None,
                      inline: bool = False, **kw: Any) -> Manifest:  # fmt: skip
    """Dispatch to :func:`build_from_webdataset` or :func:`build_from_parquet_shards`
    (``kind`` None: detected); ``label`` is the label member / column name."""
    so = kw.get("storage_options")
    src = os.fspath(source)
    kind = kind or detect_shards(src, so)
    if kind not in SUFFIXES:
        raise ManifestError(f"{redact_uri(src)}: not a WebDataset tar or Parquet shard (folder)")
    if inline:
        raise ManifestError("--inline copies every byte; a shard manifest reads them in place")
    if kind == WEBDATASET:
        return build_from_webdataset(src, out, label_member=label or "cls", **kw)
    return build_from_parquet_shards(src, out, label_column=label or "label", **kw)


# ------------------------------------------------------------------------------- tars
def _open(shard: str, storage_options: dict[str, Any] | None) -> Any:
    if is_local(shard):
        return open(local_path(shard), "rb")
    fs, path = url_to_fs(shard, storage_options)
    return fs.open(path, "rb", block_size=8 * 2**20)  # read ahead: one streaming pass


def _tar_samples(shard: str, label_member: str, storage_options: dict[str, Any] | None
                 ) -> list[tuple[str, int | None, int | None, str | None]]:  # fmt: skip
    """``(key, image offset, image length, label text)`` of every sample in one tar."""
    name = redact_uri(shard)
    samples: dict[str, dict[str, Any]] = {}
    try:
        with _open(shard, storage_options) as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(0)
            try:
                tar = tarfile.open(fileobj=fh, mode="r:")
            except tarfile.TarError as exc:
                raise ManifestError(f"shard {name}: not a tar file ({exc})") from None
            while True:
                try:
                    ti = tar.next()
                except tarfile.TarError as exc:
                    log.warning("shard %s: unreadable tar header (%s); later members skipped",
                                name, exc)  # fmt: skip
                    break
                if ti is None:
                    break
                if not ti.isfile():
                    continue
                base = ti.name.rsplit("/", 1)[-1]
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = ti.name[: len(ti.name) - len(base)] + stem
                sample = samples.setdefault(key, {})
                ext = ext.lower()
                if ext == label_member.lower() and ti.offset_data + ti.size <= size:
                    fh.seek(ti.offset_data)
                    sample["label"] = fh.read(ti.size).decode("utf-8", "replace").strip()
                elif ext in _IMAGE_EXTS and "image" not in sample:
                    sample["image"] = (ti.offset_data, ti.size)
            if tar.offset < size:  # what follows the last header must be zero padding
                fh.seek(tar.offset)
                if fh.read(min(size - tar.offset, 1 << 16)).strip(b"\0"):
                    log.warning("shard %s: unreadable data after byte %d; members after it "
                                "are not in the manifest", name, tar.offset)  # fmt: skip
    except ManifestError:
        raise
    except FileNotFoundError:
        raise ManifestError(f"shard {name}: no such file") from None
    except OSError as exc:
        raise ManifestError(f"shard {name}: {type(exc).__name__}: {exc}") from None
    out = []
    for key, s in samples.items():
        off, n = s.get("image", (None, None))
        out.append((key, off, n, s.get("label")))
    return out


def build_from_webdataset(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    label_member: str = "cls",
    class_list: str | os.PathLike[str] | Sequence[str] | ClassList | None = None,
    unit_size: int = DEFAULT_UNIT_SIZE,
    storage_options: dict[str, Any] | None = None,
    relative: bool = False,
    read_threads: int = 8,
) -> Manifest:
    """Manifest of WebDataset tar shards (one ``.tar`` or a folder/prefix of them).

    Each sample (members sharing a key) is one row: its first image member's byte range,
    its label from the ``label_member`` member (an integer, or a synset with
    ``class_list``); ``uri`` is ``shard.tar#key``. A sample without an image member keeps
    its row (the run records it as MISSING); a member cut short by a truncated tar keeps
    its declared length (the run records TRUNCATED). ``read_threads`` tars are read at once.
    """
    classes = load_class_list(class_list, storage_options) if class_list is not None else None
    entries: list[tuple[Any, ...]] = []
    found = list_shards(os.fspath(source), WEBDATASET, storage_options)
    with ThreadPoolExecutor(max_workers=read_threads) as pool:  # shards are independent
        listed = pool.map(lambda sh: _tar_samples(sh, label_member, storage_options), found)
        per_shard = list(listed)
    for shard, samples in zip(found, per_shard, strict=True):
        for key, off, n, text in samples:
            where = f"shard {redact_uri(shard)} key {key!r}"
            label = label_of(text, classes, where) if text else None
            entries.append((f"{shard}#{key}", label, shard, off, n))
    if not entries:
        raise ManifestError(f"{redact_uri(os.fspath(source))}: no samples in the shards")
    fields = [pa.field("shard", pa.string()), pa.field("offset", pa.int64()),
              pa.field("length", pa.int64())]  # fmt: skip
    return write_manifest(entries, out, unit_size=unit_size, storage_options=storage_options,
                          relative=relative, classes=classes, source=normalise_location(source),
                          builder=f"build_from_webdataset(label_member={label_member})",
                          extra_fields=fields)  # fmt: skip


# ---------------------------------------------------------------------------- parquet
def _hf_class_names(schema: pa.Schema, column: str) -> list[str] | None:
    """The ``ClassLabel`` names of ``column`` in a ``datasets`` file's schema metadata."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


def build_from_parquet_shards(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    label_column: str = "label",
    image_column: str = "image",
    class_list: str | os.PathLike[str] | Sequence[str] | ClassList | None = None,
    unit_size: int = DEFAULT_UNIT_SIZE,
    storage_options: dict[str, Any] | None = None,
    relative: bool = False,
) -> Manifest:
    """Manifest of Parquet shards with an image column (one file or a folder/prefix).

    ``image_column`` is ``struct<bytes, path>`` (``datasets``' Image feature) or binary;
    ``label_column`` integer labels (negative = unknown, as ``datasets`` writes them) or
    synsets with ``class_list``; a missing label column means no labels. Class names come
    from ``class_list`` or else the ``ClassLabel`` names in the schema metadata. Only the
    footers and the label column are read; ``uri`` is ``shard.parquet#row``.
    """
    classes = load_class_list(class_list, storage_options) if class_list is not None else None
    hf_names: list[str] | None = None
    entries: list[tuple[Any, ...]] = []
    for shard in list_shards(os.fspath(source), PARQUET, storage_options):
        name = redact_uri(shard)
        fh = None
        try:
            fh = _open(shard, storage_options)
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            if image_column not in schema.names:
                raise ManifestError(f"shard {name}: no {image_column!r} column "
                                    f"(columns: {schema.names})")  # fmt: skip
            t = schema.field(image_column).type
            if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
                    pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)):  # fmt: skip
                raise ManifestError(f"shard {name}: column {image_column!r} is {t}, expected "
                                    "struct<bytes, path> or binary")  # fmt: skip
            names = _hf_class_names(schema, label_column)
            if names is not None and hf_names is not None and names != hf_names:
                raise ManifestError(f"shard {name}: its class names differ from the first "
                                    "shard's")  # fmt: skip
            hf_names = names or hf_names
            labels: list[Any] = (pf.read(columns=[label_column])[label_column].to_pylist()
                                 if label_column in schema.names else [None] * pf.metadata.num_rows)  # fmt: skip
            md = pf.metadata
        except ManifestError:
            raise
        except FileNotFoundError:
            raise ManifestError(f"shard {name}: no such file") from None
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"shard {name}: not a readable Parquet file ({exc})") from None
        finally:
            if fh is not None:
                fh.close()
        known = classes or (ClassList(tuple(hf_names), tuple(hf_names)) if hf_names else None)
        i = 0
        for g in range(md.num_row_groups):
            for r in range(md.row_group(g).num_rows):
                lab = labels[i]
                if isinstance(lab, str):
                    lab = label_of(lab, known, f"shard {name} row {i}")
                elif lab is not None and int(lab) < 0:
                    lab = None
                entries.append((f"{shard}#{i}", lab, shard, g, r))
                i += 1
    if not entries:
        raise ManifestError(f"{redact_uri(os.fspath(source))}: no rows in the shards")
    if classes is None and hf_names:
        classes = ClassList(tuple(hf_names), tuple(hf_names))
    fields = [pa.field("shard", pa.string()), pa.field("row_group", pa.int32()),
              pa.field("row", pa.int32())]  # fmt: skip
    return write_manifest(entries, out, unit_size=unit_size, storage_options=storage_options,
                          relative=relative, classes=classes, source=normalise_location(source),
                          builder=f"build_from_parquet_shards(label_column={label_column})",
                          extra_fields=fields,
                          metadata={META_IMAGE_COLUMN: image_column.encode()})  # fmt: skip
