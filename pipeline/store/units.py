"""The worker's side of the store: a unit's shards and its marker, and the markers read back.

Why its own module: this is all a worker touches (``UnitWriter``), and all the driver and
readers need to know which units are done (``done_units``, ``read_markers``); creating,
opening and finalising a store is the driver's (:mod:`pipeline.store.io`). The one
definition of every array's Zarr arguments (:func:`array_kwargs`) lives here, below both,
so a writer rebuilds the metadata the driver created instead of reading it back.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import re
import socket
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.array import AsyncArray
from zarr.core.sync import sync
from zarr.storage import StorePath

from pipeline.data.decode import Status
from pipeline.data.location import is_local, normalise_location, redact_uri, url_to_fs
from pipeline.messages import error_line
from pipeline.store.checksum import RecordingStore
from pipeline.store.layout import (
    MARKERS,
    MAX_ERROR_CHARS,
    ArraySpec,
    StoreError,
    StoreLayout,
    marker_key,
    parse_codec,
    redact,
)

__all__ = [
    "UnitWriter",
    "array_kwargs",
    "done_units",
    "now",
    "read_markers",
    "write_unit",
    "zstore",
]

_MARKER_RE = re.compile(r"^unit-(\d+)$")


def zstore(loc: str, storage_options: dict[str, Any] | None, read_only: bool) -> Any:
    """The zarr store at ``loc``: local files, or fsspec for ``s3://``, ``gs://``, ..."""
    if is_local(loc):
        return zarr.storage.LocalStore(loc, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(
        loc, storage_options=storage_options or None, read_only=read_only
    )


def now() -> str:
    """UTC now, ISO 8601 to the second (markers, attributes)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def array_kwargs(spec: ArraySpec, layout: StoreLayout) -> dict[str, Any]:
    """``zarr.create_array`` arguments of one per-image array: the one definition that the
    driver creates the store with and a :class:`UnitWriter` rebuilds the metadata from (so
    a worker never reads it). Maps: one shard per unit of ``layout.map_chunk``-row inner
    chunks, Blosc with byte shuffle (smooth float16 maps compress ~1.5x better shuffled);
    every other array: one plain chunk per unit."""
    kwargs: dict[str, Any] = {}
    if spec.sharded:
        cname, clevel = parse_codec(layout.map_codec)
        kwargs["chunks"] = (spec.inner, *spec.trailing)
        kwargs["shards"] = (layout.unit_size, *spec.trailing)
        kwargs["compressors"] = BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle")
    else:
        kwargs["chunks"] = (layout.unit_size, *spec.trailing)
    return dict(
        shape=(layout.num_rows, *spec.trailing),
        dtype=str if spec.dtype == "str" else spec.dtype,
        fill_value=spec.fill,
        dimension_names=spec.dims,
        attributes=redact(spec.attrs),
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Worker: one unit
# ---------------------------------------------------------------------------------------------
def _prepare(spec: ArraySpec, value: Any, rows: int, u: int) -> np.ndarray:
    where = f"write_unit(unit {u}): array {spec.name!r}"
    if spec.dtype == "str":
        seq = np.asarray(value, dtype=object).reshape(-1)
        if seq.shape != (rows,):
            raise StoreError(f"{where} has {seq.shape[0]} values, expected {rows}")
        out = np.empty(rows, dtype=object)
        for i, v in enumerate(seq):
            s = "" if v is None else " ".join(str(v).split())
            out[i] = s if len(s) <= MAX_ERROR_CHARS else s[: MAX_ERROR_CHARS - 3] + "..."
        return out
    arr = np.asarray(value)
    expected = (rows, *spec.trailing)
    if arr.shape != expected:
        raise StoreError(f"{where} has shape {arr.shape}, expected {expected}")
    dtype = np.dtype(spec.dtype)
    if dtype.kind in "iu":
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)):
                raise StoreError(f"{where} has NaN/inf but is {dtype} (use {spec.fill})")
            arr = np.rint(arr)
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise StoreError(f"{where} has values outside {dtype} [{info.min}, {info.max}]")
    return arr.astype(dtype, copy=False)


class UnitWriter:
    """WORKER: writes whole units of one store, reading no metadata.

    Why a writer object: the layout travels from the driver (it created the store from
    it), so the arrays' metadata is rebuilt here in memory from the same definition
    (:func:`_array_kwargs`) instead of read back for every unit; an actor makes one writer
    and every unit then costs only its own chunks, shards and marker. Every object written
    goes through a :class:`RecordingStore`, so the marker lists each one's key, size and
    CRC32C (what ``unioncam verify`` checks later). All arrays of a unit are written
    concurrently on zarr's event loop (object-store latency dominates remote writes; Blosc
    compresses the inner chunks in zarr's threads).
    """

    def __init__(
        self,
        store_path: str | os.PathLike[str],
        layout: StoreLayout,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.loc = normalise_location(store_path)
        self.layout = layout
        self._base = zstore(self.loc, storage_options, read_only=False)
        self._storage_options = storage_options
        self._specs = layout.arrays()
        self._aliases = layout.aliases()
        scratch = zarr.storage.MemoryStore()
        self._meta = {s.name: zarr.create_array(scratch, name=s.name,
                                                **array_kwargs(s, layout)).metadata
                      for s in self._specs}  # fmt: skip

    def write(
        self, u: int, arrays: Mapping[str, Any], *, info: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write every array's rows of unit ``u`` (whole shards), then its marker.

        ``arrays`` maps array names (``maps``, ``status``, ..., ``components/<name>``,
        ``metrics/<name>``, ``methods/<name>``) to ``(rows, ...)`` arrays for this unit;
        ``status`` and ``maps`` are required, every array not given is written with its
        fill value ("not available"), so rewriting a unit always yields the same store
        (idempotent: an actor may die after writing and the unit be retried). ``info``
        adds fields to the marker (e.g. ``attempt``). Returns the marker dict.
        """
        t0 = time.perf_counter()
        wall0 = time.time()
        layout = self.layout
        start, stop = layout.unit_range(int(u))
        rows = stop - start
        unknown = sorted(k for k in arrays if k not in self._aliases)
        if unknown:
            raise StoreError(f"write_unit(unit {u}): unknown array(s) {unknown}; known: "
                             f"{sorted(set(self._aliases))}")  # fmt: skip
        given = {self._aliases[k]: v for k, v in arrays.items()}
        for required in ("status", "maps"):
            if required not in given:
                raise StoreError(f"write_unit(unit {u}): array {required!r} is required")
        data = {
            s.name: _prepare(s, given[s.name], rows, u) if s.name in given else s.empty(rows)
            for s in self._specs
        }
        status = data["status"]
        valid = {int(s) for s in Status if s is not Status.PENDING}
        bad = sorted(set(np.unique(status).tolist()) - valid)
        if bad:
            raise StoreError(
                f"write_unit(unit {u}): status has invalid code(s) {bad} (PENDING=255 means "
                "'never processed' and cannot be written)"
            )
        store = RecordingStore(self._base)

        async def put_all() -> None:
            await asyncio.gather(*(
                AsyncArray(self._meta[s.name], StorePath(store, s.name)).setitem(
                    slice(start, stop), data[s.name])
                for s in self._specs
            ))  # fmt: skip

        try:
            sync(put_all())
        except OSError as e:  # a full disk, a lost mount, an object store that keeps failing
            raise StoreError(
                f"unit {u}: cannot write to store {redact_uri(self.loc)}: {error_line(e)}"
            ) from e
        counts = np.bincount(status.astype(np.int64), minlength=256)
        marker = {
            "unit": int(u),
            "start": int(start),
            "stop": int(stop),
            "rows": int(rows),
            "ok": int(counts[int(Status.OK)]),
            "failed": int(rows - counts[int(Status.OK)]),
            "by_status": {s.name: int(counts[int(s)]) for s in Status if counts[int(s)]},
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "written_at": now(),
            "write_seconds": round(time.perf_counter() - t0, 3),
            # When the writes started (Unix seconds): with write_seconds, the window a GPU
            # check compares with the device's busy trace.
            "write_started": round(wall0, 3),
            **redact(dict(info or {})),
            **store.record(),
        }
        _write_marker(self.loc, int(u), marker, self._storage_options)
        return marker


def write_unit(
    store_path: str | os.PathLike[str],
    layout: StoreLayout,
    u: int,
    arrays: Mapping[str, Any],
    storage_options: dict[str, Any] | None = None,
    *,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """WORKER: write unit ``u`` of the store of ``layout`` (see :meth:`UnitWriter.write`);
    for many units make one :class:`UnitWriter` and reuse it."""
    return UnitWriter(store_path, layout, storage_options).write(u, arrays, info=info)


def _write_marker(
    loc: str, u: int, marker: dict[str, Any], storage_options: dict[str, Any] | None
) -> None:
    body = json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": marker}, indent=1
    ).encode()
    key = f"{marker_key(u)}/zarr.json"
    if is_local(loc):
        final = os.path.join(loc, *key.split("/"))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(body)
            os.replace(tmp, final)  # atomic: a marker is either absent or complete
        finally:
            if os.path.exists(tmp):  # a failed write (full disk) leaves no debris
                os.remove(tmp)
    else:
        fs, root = url_to_fs(loc, storage_options)
        fs.pipe_file(f"{root}/{key}", body)  # one PUT: atomic on object stores


def done_units(
    store_path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> set[int]:
    """Units whose completion marker exists (one listing; never inferred from chunks)."""
    loc = normalise_location(store_path)
    if is_local(loc):
        mdir = os.path.join(loc, MARKERS)
        try:
            entries = list(os.scandir(mdir))
        except FileNotFoundError:
            return set()
        out = set()
        for e in entries:
            m = _MARKER_RE.match(e.name)
            if m and os.path.isfile(os.path.join(e.path, "zarr.json")):
                out.add(int(m.group(1)))
        return out
    fs, root = url_to_fs(loc, storage_options)
    mdir = f"{root}/{MARKERS}"
    fs.invalidate_cache(mdir)  # listings are cached by s3fs; workers add markers meanwhile
    try:
        names = fs.ls(mdir, detail=False, refresh=True)
    except FileNotFoundError:
        return set()
    out = set()
    for n in names:
        m = _MARKER_RE.match(n.rstrip("/").rsplit("/", 1)[-1])
        if m:
            out.add(int(m.group(1)))
    return out


def read_markers(
    store_path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> dict[int, dict[str, Any]]:
    """Unit -> marker attributes (unit, rows, ok, failed, by_status, host, seconds, ...)."""
    loc = normalise_location(store_path)
    units = sorted(done_units(loc, storage_options))
    keys = [f"{marker_key(u)}/zarr.json" for u in units]
    if is_local(loc):
        raw = {}
        for u, key in zip(units, keys, strict=True):
            with open(os.path.join(loc, *key.split("/")), "rb") as fh:
                raw[u] = fh.read()
    else:
        fs, root = url_to_fs(loc, storage_options)
        got = fs.cat([f"{root}/{k}" for k in keys]) if keys else {}
        raw = {u: got[f"{root}/{k}"] for u, k in zip(units, keys, strict=True)}
    out = {}
    for u, body in raw.items():
        try:
            out[u] = json.loads(body).get("attributes", {})
        except ValueError:
            out[u] = {"unit": u, "unreadable": True}
    return out
