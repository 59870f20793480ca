"""Reading images out of shards in place: WebDataset tars and Parquet files with an image column.

Why read in place: at ImageNet scale datasets are kept as a few thousand large shards, not
1.28M loose files. A shard manifest (built by :mod:`pipeline.data.build_shards`) records
where each image lives, and a unit's bytes are fetched with few large reads instead of a
copy of the dataset:

* **WebDataset** rows carry the byte range ``(offset, length)`` of their image member; the
  ranges of one shard within a unit are sorted and coalesced (gaps of a ``.cls`` member and
  a tar header are read through), so a unit of consecutive samples is one or a few reads.
* **Parquet** rows carry ``(row_group, row)``; each source row group a unit touches is read
  once, image column only (one ranged read of its column chunk, plus the footer per shard).

Every failure is a :class:`~pipeline.data.decode.DecodeError` for that row, naming the row's
``shard#key`` (a missing shard, a tar cut short, a null image cell); the bytes then go
through the one decode path (:func:`pipeline.data.decode.load_row`) like any file's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.decode import DecodeError, Status
from pipeline.data.location import is_local, local_path, redact_uri, resolve_uri, url_to_fs

__all__ = [
    "PARQUET",
    "SHARD_COLUMNS",
    "WEBDATASET",
    "Fetched",
    "coalesce",
    "fetch_parquet",
    "fetch_tar",
    "fetch_unit",
    "shard_kind",
]

WEBDATASET = "webdataset"
PARQUET = "parquet"
#: The manifest columns that point into shards (see :mod:`pipeline.data.manifest`).
SHARD_COLUMNS = {WEBDATASET: ("shard", "offset", "length"), PARQUET: ("shard", "row_group", "row")}
#: Ranges of one tar closer than this are read as one (the gap is a header and a .cls).
MAX_GAP = 256 * 1024
#: ... as long as one read stays under this.
MAX_SPAN = 64 * 2**20

#: What a fetch gives each row: its bytes or the reason there are none.
Fetched = tuple[bytes | None, DecodeError | None]


def shard_kind(columns: Sequence[str]) -> str | None:
    """``"webdataset"``, ``"parquet"`` or ``None`` (a manifest of files), from its columns."""
    names = set(columns)
    for kind, cols in SHARD_COLUMNS.items():
        if set(cols) <= names:
            return kind
    return None


def _error(status: Status, uri: str, what: str) -> DecodeError:
    return DecodeError(status, f"{redact_uri(uri)}: {what}")


def _io_error(exc: BaseException, shard: str) -> tuple[Status, str]:
    name = redact_uri(shard)
    if isinstance(exc, FileNotFoundError):
        return Status.MISSING, f"shard {name} not found"
    if isinstance(exc, PermissionError):
        return Status.READ_ERROR, f"shard {name}: access denied"
    text = str(exc) or type(exc).__name__
    return Status.READ_ERROR, f"shard {name}: {type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------------- tar
def coalesce(ranges: Sequence[tuple[int, int]], *, max_gap: int = MAX_GAP,
             max_span: int = MAX_SPAN) -> list[tuple[int, int, list[int]]]:  # fmt: skip
    """``(offset, length)`` ranges -> ``(start, end, [indices])`` reads, in offset order.

    Ranges closer than ``max_gap`` share a read while it stays under ``max_span`` bytes, so
    the consecutive samples of a tar cost one read, not one per image.
    """
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    reads: list[tuple[int, int, list[int]]] = []
    for i in order:
        off, n = ranges[i]
        if reads:
            start, end, members = reads[-1]
            if off - end <= max_gap and max(end, off + n) - start <= max_span:
                reads[-1] = (start, max(end, off + n), members + [i])
                continue
        reads.append((off, off + n, [i]))
    return reads


def _read_ranges(shard: str, spans: list[tuple[int, int]],
                 storage_options: dict[str, Any] | None) -> tuple[int, list[bytes]]:  # fmt: skip
    """The shard's size and the bytes of each ``[start, end)`` span (clamped to the size)."""
    if is_local(shard):
        with open(local_path(shard), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            out = []
            for start, end in spans:
                fh.seek(min(start, size))
                out.append(fh.read(max(0, min(end, size) - start)))
            return size, out
    fs, path = url_to_fs(shard, storage_options)
    size = int(fs.size(path))
    return size, [
        bytes(fs.cat_file(path, start=start, end=min(end, size))) if start < size else b""
        for start, end in spans
    ]


def fetch_tar(
    shards: Sequence[str],
    offsets: Sequence[int | None],
    lengths: Sequence[int | None],
    uris: Sequence[str],
    storage_options: dict[str, Any] | None = None,
) -> list[Fetched]:
    """The image bytes of tar members by byte range; one entry per row, never raises."""
    out: list[Fetched] = [(None, None)] * len(uris)
    by_shard: dict[str, list[int]] = {}
    for i, (shard, off, n) in enumerate(zip(shards, offsets, lengths, strict=True)):
        if off is None or n is None:
            out[i] = (None, _error(Status.MISSING, uris[i], "no image member in the shard"))
        else:
            by_shard.setdefault(shard, []).append(i)
    for shard, rows in by_shard.items():
        reads = coalesce([(int(offsets[i]), int(lengths[i])) for i in rows])  # type: ignore[arg-type]
        try:
            size, datas = _read_ranges(shard, [(s, e) for s, e, _ in reads], storage_options)
        except Exception as exc:  # the whole shard failed: every row of it says why
            status, what = _io_error(exc, shard)
            for i in rows:
                out[i] = (None, _error(status, uris[i], what))
            continue
        for (start, _end, members), data in zip(reads, datas, strict=True):
            for j in members:
                i = rows[j]
                off, n = int(offsets[i]), int(lengths[i])  # type: ignore[arg-type]
                if off + n > size:
                    got = max(0, size - off)
                    out[i] = (None, _error(Status.TRUNCATED, uris[i],
                                           f"tar member cut short ({got} of {n} bytes)"))  # fmt: skip
                else:
                    out[i] = (data[off - start : off - start + n], None)
    return out


# ------------------------------------------------------------------------------ parquet
def _open_parquet(shard: str, storage_options: dict[str, Any] | None) -> tuple[Any, Any]:
    if is_local(shard):
        return pq.ParquetFile(local_path(shard)), None
    fs, path = url_to_fs(shard, storage_options)
    # No read-ahead: pyarrow asks for exactly the footer and each column chunk it needs.
    handle = fs.open(path, "rb", cache_type="none")
    return pq.ParquetFile(handle), handle


def _image_bytes(column: pa.ChunkedArray) -> list[bytes | None]:
    """The bytes of an image column: HF's ``struct<bytes, path>`` or plain binary."""
    col = column.combine_chunks()
    if pa.types.is_struct(col.type):
        col = col.field("bytes")
    return col.to_pylist()


def fetch_parquet(
    shards: Sequence[str],
    row_groups: Sequence[int | None],
    rows: Sequence[int | None],
    uris: Sequence[str],
    storage_options: dict[str, Any] | None = None,
    *,
    image_column: str = "image",
) -> list[Fetched]:
    """The image bytes of Parquet rows: each source row group read once (image column only)."""
    out: list[Fetched] = [(None, None)] * len(uris)
    by_shard: dict[str, dict[int, list[int]]] = {}
    for i, (shard, g, r) in enumerate(zip(shards, row_groups, rows, strict=True)):
        if g is None or r is None:
            out[i] = (None, _error(Status.MISSING, uris[i], "no row in the shard"))
        else:
            by_shard.setdefault(shard, {}).setdefault(int(g), []).append(i)
    for shard, groups in by_shard.items():
        handle = None
        try:
            pf, handle = _open_parquet(shard, storage_options)
            for g, members in groups.items():
                try:
                    datas = _image_bytes(pf.read_row_group(g, columns=[image_column])[image_column])
                except Exception as exc:  # a damaged row group costs its rows only
                    status, what = _io_error(exc, shard)
                    for i in members:
                        out[i] = (None, _error(status, uris[i], f"row group {g}: {what}"))
                    continue
                for i in members:
                    r = int(rows[i])  # type: ignore[arg-type]
                    data = datas[r] if r < len(datas) else None
                    if data is None:
                        why = "no such row" if r >= len(datas) else f"null '{image_column}' bytes"
                        out[i] = (None, _error(Status.MISSING, uris[i], why))
                    else:
                        out[i] = (data, None)
        except Exception as exc:  # the shard cannot be opened: every row of it says why
            status, what = _io_error(exc, shard)
            for members in groups.values():
                for i in members:
                    if out[i] == (None, None):
                        out[i] = (None, _error(status, uris[i], what))
        finally:
            if handle is not None:
                handle.close()
    return out


def fetch_unit(
    kind: str,
    table: pa.Table,
    uris: Sequence[str | None],
    base: str,
    storage_options: dict[str, Any] | None = None,
    *,
    image_column: str = "image",
) -> tuple[list[bytes | None], list[DecodeError | None]]:
    """Bytes and errors of a unit's rows from the manifest's shard columns in ``table``
    (``shard`` resolved against the manifest's folder ``base``, like ``uri``)."""
    where = [resolve_uri(s, base) or "" for s in table["shard"].to_pylist()]
    a, b = (table[c].to_pylist() for c in SHARD_COLUMNS[kind][1:])
    names = [u or "" for u in uris]
    if kind == WEBDATASET:
        got = fetch_tar(where, a, b, names, storage_options)
    else:
        got = fetch_parquet(where, a, b, names, storage_options, image_column=image_column)
    return [d for d, _ in got], [e for _, e in got]
