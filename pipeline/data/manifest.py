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
shard      string, opt. the shard holding the image (path/URL, relative like ``uri``);
                        then ``uri`` is ``shard#key`` (tar) or ``shard#row`` (Parquet)
offset     int64, opt.  WebDataset: byte offset of the image member's data in the tar
length     int64, opt.  WebDataset: its size in bytes (offset/length null: no image member)
row_group  int32, opt.  Parquet shards: the source row group holding the image
row        int32, opt.  Parquet shards: the row within that row group
========== ============ ==========================================================

A shard manifest's images are read in place (:mod:`pipeline.data.shards`); a Parquet one
names the source's image column in ``unioncam.image_column`` metadata (default ``image``).

Every row group but the last holds exactly ``unit_size`` rows. :meth:`Manifest.open`
checks all of this up front and raises one :class:`ManifestError` line, so a bad manifest
fails before a cluster is started, not in unit 812 after an hour.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data import shards
from pipeline.data.decode import DecodeError, read_bytes
from pipeline.data.location import (
    is_local,
    normalise_location,
    parent_location,
    redact_uri,
    resolve_uri,
    url_to_fs,
)

__all__ = [
    "DEFAULT_UNIT_SIZE",
    "unit_range",
    "IMAGE_EXTENSIONS",
    "Manifest",
    "ManifestError",
    "Row",
    "manifest_schema",
    "read_text",
]

DEFAULT_UNIT_SIZE = 1024
FORMAT = "unioncam-manifest-1"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
     ".pgm", ".pbm", ".jp2", ".j2k", ".avif", ".ico"}
)  # fmt: skip

META_FORMAT = b"unioncam.format"
META_UNIT = b"unioncam.unit_size"
META_CLASSES = b"unioncam.classes"
META_CLASS_NAMES = b"unioncam.class_names"
META_SOURCE = b"unioncam.source"
META_BUILDER = b"unioncam.builder"
META_IMAGE_COLUMN = b"unioncam.image_column"


def unit_range(u: int, *, unit_size: int, num_rows: int) -> tuple[int, int]:
    """Row ids ``[start, stop)`` of unit ``u``: what "unit u" means in the manifest (row
    group ``u``), in the store (shard ``u``) and in its completion marker.
    Raises ``IndexError`` for a unit outside ``0..num_units-1``."""
    num_units = -(-num_rows // unit_size)
    if not 0 <= u < num_units:
        raise IndexError(f"unit {u} out of range 0..{num_units - 1}")
    start = u * unit_size
    return start, min(start + unit_size, num_rows)


class ManifestError(ValueError):
    """A manifest (or a builder input) is unusable; the message is one line naming it."""


@dataclass(frozen=True, slots=True)
class Row:
    """One image of a unit. ``uri`` is resolved (absolute path or full URL) or None.
    ``error``: why a shard row's bytes could not be fetched (the row's status)."""

    row_id: int
    uri: str | None
    label: int | None
    data: bytes | None = None
    error: DecodeError | None = None


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


def read_text(uri: str, storage_options: dict[str, Any] | None) -> str:
    try:
        data = read_bytes(uri, storage_options)
    except DecodeError as exc:
        raise ManifestError(exc.message) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"{redact_uri(uri)}: not a UTF-8 text file") from None


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
        self._base = parent_location(uri)

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
        loc = normalise_location(uri)
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
                    what = "is a directory" if os.path.isdir(loc) else "no such file"
                    raise ManifestError(f"manifest {name}: {what}")
                return pq.ParquetFile(loc), None
            fs, path = url_to_fs(loc, storage_options)
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
        kind = shards.shard_kind(schema.names)
        for col in shards.SHARD_COLUMNS.get(kind or "", ())[1:]:
            if not pa.types.is_integer(schema.field(col).type):
                raise self._fail(f"column {col!r} must be an integer, is {schema.field(col).type}")
        if self._num_rows == 0:
            raise self._fail("no rows")
        sizes = self._group_rows
        declared = self._kv.get(META_UNIT.decode())
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
    def shard_kind(self) -> str | None:
        """``"webdataset"`` or ``"parquet"`` when rows point into shards, else None."""
        return shards.shard_kind(list(self._columns))

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
        raw = self._kv.get(META_CLASSES.decode())
        return list(json.loads(raw)) if raw else None

    @property
    def class_names(self) -> list[str] | None:
        """Class index -> human-readable name, when the class list had names."""
        raw = self._kv.get(META_CLASS_NAMES.decode())
        return list(json.loads(raw)) if raw else None

    @property
    def metadata(self) -> dict[str, str]:
        """The ``unioncam.*`` key-value metadata written by the builder."""
        return {k: v for k, v in self._kv.items() if k.startswith("unioncam.")}

    # -- units ---------------------------------------------------------------------------
    def unit_range(self, u: int) -> tuple[int, int]:
        """Row ids ``[start, stop)`` of unit ``u``."""
        try:
            return unit_range(u, unit_size=self._unit_size, num_rows=self._num_rows)
        except IndexError:
            raise IndexError(
                f"unit {u} out of range: manifest {redact_uri(self._uri)} has "
                f"{self.num_units} units (0..{self.num_units - 1})"
            ) from None

    def unit_of(self, row_id: int) -> int:
        """The unit that holds ``row_id``."""
        if not 0 <= row_id < self._num_rows:
            raise IndexError(f"row_id {row_id} out of range 0..{self._num_rows - 1}")
        return row_id // self._unit_size

    def read_unit(self, u: int, *, with_images: bool = True,
                  only: Iterable[int] | None = None) -> list[Row]:  # fmt: skip
        """The rows of unit ``u`` (one row group read; URIs resolved); with ``only``, just
        those row ids (building all 1,024 was most of an overlay's manifest lookup)."""
        start, stop = self.unit_range(u)
        cols = ["row_id", "uri"]
        if "label" in self._columns:
            cols.append("label")
        if with_images and self.has_images:
            cols.append("image")
        kind = self.shard_kind
        if with_images and kind is not None:
            cols += shards.SHARD_COLUMNS[kind]
        with self._lock:
            t = self._parquet().read_row_group(u, columns=cols)
        ids = t["row_id"].to_numpy(zero_copy_only=False)
        if len(ids) != stop - start or ids[0] != start or ids[-1] != stop - 1:
            raise self._fail(
                f"unit {u} holds row ids {ids[0]}..{ids[-1]}, expected {start}..{stop - 1}"
            )
        if only is not None and kind is None:  # a shard's fetch wants its whole unit
            keep = np.asarray(sorted({int(r) - start for r in only}), dtype=np.int64)
            t, ids = t.take(keep), ids[keep]
        uris = [resolve_uri(uri, self._base) for uri in t["uri"].to_pylist()]
        labels = t["label"].to_pylist() if "label" in cols else [None] * len(ids)
        datas = t["image"].to_pylist() if "image" in cols else [None] * len(ids)
        errors: list[DecodeError | None] = [None] * len(ids)
        if with_images and kind is not None:  # outside the lock: two units fetch at once
            column = self._kv.get(META_IMAGE_COLUMN.decode(), "image")
            datas, errors = shards.fetch_unit(kind, t, uris, self._base, self._storage_options,
                                              image_column=column)  # fmt: skip
        return [
            Row(int(i), uri, None if lab is None else int(lab), data, err)
            for i, uri, lab, data, err in zip(ids.tolist(), uris, labels, datas, errors,
                                              strict=True)  # fmt: skip
        ]

    def get_rows(self, row_ids: Iterable[int], *, with_images: bool = True) -> list[Row]:
        """Rows by id (in the order given), reading only the units that hold them."""
        wanted = [int(r) for r in row_ids]
        ids_of: dict[int, list[int]] = {}
        for r in wanted:
            ids_of.setdefault(self.unit_of(r), []).append(r)
        got = {row.row_id: row for u, ids in ids_of.items()
               for row in self.read_unit(u, with_images=with_images, only=ids)}  # fmt: skip
        return [got[r] for r in wanted]

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
