"""The Zarr v3 store of a run: pre-sized arrays along ``image``, one shard per unit, markers.

Why this layout (zarr 3.1.x):

* One unit of work = one Parquet row group = one shard (or chunk) of EVERY array along the
  ``image`` axis. Two processes writing to one shard lose data silently (zarr issue 3682), so
  the layout makes that impossible by construction: a worker only ever writes the rows of its
  own unit, which are whole shards.
* Only the driver writes metadata (:func:`create_store`, :func:`finalize_store`); workers
  (:func:`write_unit`) write shard/chunk objects and one completion marker, nothing else.
* ``write_empty_chunks`` is off in zarr 3, so a missing chunk can mean "failed image" as
  well as "not written yet": completion is recorded by a marker
  ``markers/unit-000017/zarr.json`` written LAST, after every array of the unit. The marker
  is a tiny Zarr group whose attributes are the unit's summary, so zarr and xarray see a
  valid hierarchy (no "unrecognised object" warnings) and ``done_units`` is one listing.
* Fill values make "not written" unambiguous: ``status`` 255 (``PENDING``), maps NaN,
  indices -1, strings "".
* Every array has ``dimension_names`` so ``xarray.open_zarr`` opens the store directly.

Secrets: ``storage_options`` is passed to fsspec and never stored or formatted;
attributes and markers go through :func:`redact` (credential-like keys are blanked).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
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
    LAYOUT_ATTR,
    MARKERS,
    MAX_ERROR_CHARS,
    ArraySpec,
    StoreError,
    StoreFormatError,
    StoreLayout,
    StoreMismatchError,
    check_format,
    marker_key,
    parse_codec,
    redact,
)

__all__ = [
    "UnitWriter",
    "create_store",
    "done_units",
    "finalize_store",
    "open_store",
    "read_layout",
    "read_markers",
    "store_exists",
    "write_unit",
]

_MARKER_RE = re.compile(r"^unit-(\d+)$")


def _array_kwargs(spec: ArraySpec, layout: StoreLayout) -> dict[str, Any]:
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
# Locations
# ---------------------------------------------------------------------------------------------
def _zstore(loc: str, storage_options: dict[str, Any] | None, read_only: bool) -> Any:
    if is_local(loc):
        return zarr.storage.LocalStore(loc, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(
        loc, storage_options=storage_options or None, read_only=read_only
    )


def _read_root_json(loc: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The root ``zarr.json`` (fresh, never a cached listing), or None if absent."""
    try:
        if is_local(loc):
            with open(os.path.join(loc, "zarr.json"), "rb") as fh:
                raw = fh.read()
        else:
            fs, root = url_to_fs(loc, storage_options)
            fs.invalidate_cache(root)
            raw = fs.cat_file(f"{root}/zarr.json")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise StoreError(f"store {redact_uri(loc)}: zarr.json is not valid JSON") from None


def _is_nonempty(loc: str, storage_options: dict[str, Any] | None) -> bool:
    if is_local(loc):
        if os.path.isfile(loc):
            return True
        return os.path.isdir(loc) and any(os.scandir(loc))
    fs, root = url_to_fs(loc, storage_options)
    fs.invalidate_cache(root)
    try:
        return bool(fs.ls(root, detail=False))
    except FileNotFoundError:
        return False


def _delete(loc: str, storage_options: dict[str, Any] | None) -> None:
    if is_local(loc):
        if os.path.isdir(loc):
            shutil.rmtree(loc)
        return
    fs, root = url_to_fs(loc, storage_options)
    try:
        fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(root)


def _layout_of(meta: Mapping[str, Any] | None, loc: str) -> StoreLayout:
    attrs = (meta or {}).get("attributes") or {}
    raw = attrs.get(LAYOUT_ATTR)
    if raw is None:
        raise StoreError(
            f"{redact_uri(loc)} is not a unioncam store (no '{LAYOUT_ATTR}' attribute)"
        )
    check_format(raw, redact_uri(loc))
    return StoreLayout.from_dict(raw)


def store_exists(
    store_path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> bool:
    """Whether a Zarr store (root ``zarr.json``) is at ``store_path`` (one small read)."""
    return _read_root_json(normalise_location(store_path), storage_options) is not None


def read_layout(
    store_path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> StoreLayout:
    """The layout of an existing store (one small read)."""
    loc = normalise_location(store_path)
    meta = _read_root_json(loc, storage_options)
    if meta is None:
        raise StoreError(f"no unioncam store at {redact_uri(loc)}")
    return _layout_of(meta, loc)


# ---------------------------------------------------------------------------------------------
# Driver: create / open / finalize
# ---------------------------------------------------------------------------------------------
def _fingerprints(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k.endswith("fingerprint")}


def create_store(
    path: str | os.PathLike[str],
    layout: StoreLayout,
    *,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create the store of ``layout`` (DRIVER ONLY), or reuse a matching one to resume.

    An existing store is reused when its layout (rows, unit size, image and map size,
    pool, components, metrics, selection rule, map chunking and codec, format) and every
    ``*fingerprint`` key of ``attrs`` (e.g. ``manifest_fingerprint``,
    ``config_fingerprint``) equal the stored ones; its attributes are then updated with
    ``attrs``. Otherwise :class:`StoreMismatchError` (one line) unless ``overwrite``, which
    deletes the old store, markers included. A path that holds something that is not a
    unioncam store is never deleted or written into.
    """
    user_attrs = redact(dict(attrs or {}))
    if LAYOUT_ATTR in user_attrs:
        raise StoreError(f"attrs must not contain the reserved key {LAYOUT_ATTR!r}")
    loc = normalise_location(path)
    name = redact_uri(loc)
    meta = _read_root_json(loc, storage_options)
    if meta is not None:
        try:
            old_layout = _layout_of(meta, loc)
        except StoreFormatError:
            if not overwrite:
                raise
            old_layout = None
        except StoreError:
            raise StoreMismatchError(
                f"{name} exists and is not a unioncam store; refusing to overwrite it"
            ) from None
        old_attrs = meta.get("attributes") or {}
        problem = (
            "an older store format" if old_layout is None
            else _mismatch(old_layout, layout, old_attrs, user_attrs)
        )  # fmt: skip
        if problem is None:
            store = _zstore(loc, storage_options, read_only=False)
            group = zarr.open_group(store, mode="r+", use_consolidated=False)
            group.update_attributes({**user_attrs, "resumed_at": _now()})
            return group
        if not overwrite:
            raise StoreMismatchError(
                f"store {name} was made for a different run ({problem}); use another store "
                "path, or replace it: --overwrite on the command line, overwrite=True in Python"
            )
        _delete(loc, storage_options)
    elif _is_nonempty(loc, storage_options):
        raise StoreMismatchError(
            f"{name} exists and is not a Zarr store; refusing to write into it"
        )
    return _create(loc, layout, user_attrs, storage_options)


#: Run settings named first, in full, when a store and a run disagree (user-facing words).
_SETTINGS = ("preset", "model", "weights", "weights_sha256", "layer", "image_size", "target",
             "explainer")


def _mismatch(
    old: StoreLayout, new: StoreLayout, old_attrs: Mapping[str, Any], new_attrs: Mapping[str, Any]
) -> str | None:
    """Every differing setting with both values in full (``preset: store faithful, this run
    fast``), or ``None`` when the store belongs to this run."""
    problems = [f"{key}: store {old_attrs.get(key)}, this run {new_attrs.get(key)}"
                for key in _SETTINGS
                if key in old_attrs and key in new_attrs and old_attrs[key] != new_attrs[key]]
    od, nd = old.to_dict(), new.to_dict()
    problems += [f"{key}: store {od.get(key)}, this run {nd[key]}"
                 for key in nd if od.get(key) != nd[key]]
    if not problems:
        old_fp, new_fp = _fingerprints(old_attrs), _fingerprints(new_attrs)
        problems = [f"{key}: store {old_fp.get(key)}, this run {new_fp.get(key)}"
                    for key in sorted(set(old_fp) | set(new_fp))
                    if old_fp.get(key) != new_fp.get(key)]
    return "; ".join(problems) or None


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _create(
    loc: str,
    layout: StoreLayout,
    user_attrs: dict[str, Any],
    storage_options: dict[str, Any] | None,
) -> zarr.Group:
    store = _zstore(loc, storage_options, read_only=False)
    root_attrs = {**user_attrs, LAYOUT_ATTR: layout.to_dict(), "created_at": _now()}
    group = zarr.open_group(store, mode="w", attributes=root_attrs)
    n = layout.num_rows
    for sub, names in (("components", layout.components), ("metrics", layout.metrics),
                       ("methods", layout.others)):
        if names:
            zarr.open_group(store, path=sub, mode="w")
    zarr.open_group(
        store,
        path=MARKERS,
        mode="w",
        attributes={"description": "one group per finished unit (unit-NNNNNN), written last"},
    )

    def make(spec: ArraySpec) -> None:
        zarr.create_array(store, name=spec.name, **_array_kwargs(spec, layout))

    def make_coord(item: tuple[str, np.ndarray, Any]) -> None:
        # Coordinates (written once, here, by the driver): xarray indexes by them.
        cname, values, fill = item
        arr = zarr.create_array(
            store,
            name=cname,
            shape=values.shape,
            chunks=(min(len(values), 1 << 20),),
            dtype=str if values.dtype == object else values.dtype,
            fill_value=fill,
            dimension_names=(cname,),
        )
        arr[:] = values

    coords: list[tuple[str, np.ndarray, Any]] = [
        ("image", np.arange(n, dtype=np.int64), 0),
        *([("pool", np.array(layout.pool, dtype=object), "")] if layout.has_pool else []),
        ("hw", np.array(["h", "w"], dtype=object), ""),
        ("box", np.array(["left", "top", "right", "bottom"], dtype=object), ""),
    ]
    # Independent metadata objects: created concurrently (object-store latency).
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(make, spec) for spec in layout.arrays()]
        futures += [pool.submit(make_coord, c) for c in coords]
        for f in futures:
            f.result()
    return group


def open_store(
    path: str | os.PathLike[str],
    mode: str = "r",
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Open a unioncam store as a ``zarr.Group`` (consolidated metadata used when present)."""
    loc = normalise_location(path)
    meta = _read_root_json(loc, storage_options)
    if meta is None:
        raise StoreError(f"no unioncam store at {redact_uri(loc)}")
    _layout_of(meta, loc)
    store = _zstore(loc, storage_options, read_only=(mode == "r"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        return zarr.open_group(store, mode=mode)


def finalize_store(
    store_path: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    summary: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """DRIVER ONLY, after the workers: write summary attributes and consolidate metadata.

    The summary counts rows by status (one read of the uint8 ``status`` array: 1.3 MB for
    ImageNet train) and finished units (markers); ``summary`` adds the driver's own numbers
    (wall time, images/s, ...). Returns the summary written.
    """
    loc = normalise_location(store_path)
    layout = read_layout(loc, storage_options)
    store = _zstore(loc, storage_options, read_only=False)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    status = np.asarray(group["status"][:])
    counts = np.bincount(status, minlength=256)
    by_status = {s.name: int(counts[int(s)]) for s in Status if counts[int(s)]}
    unknown = int(counts.sum() - sum(by_status.values()))
    if unknown:
        by_status["UNKNOWN"] = unknown
    done = done_units(loc, storage_options)
    info = {
        "rows": layout.num_rows,
        "rows_by_status": by_status,
        "units_done": len(done),
        "num_units": layout.num_units,
        "complete": len(done) == layout.num_units,
        "finalized_at": _now(),
        **redact(dict(summary or {})),
    }
    group.update_attributes({"summary": info})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(store)
    return info


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
        self._base = _zstore(self.loc, storage_options, read_only=False)
        self._storage_options = storage_options
        self._specs = layout.arrays()
        self._aliases = layout.aliases()
        scratch = zarr.storage.MemoryStore()
        self._meta = {s.name: zarr.create_array(scratch, name=s.name,
                                                **_array_kwargs(s, layout)).metadata
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
            "written_at": _now(),
            "write_seconds": round(time.perf_counter() - t0, 3),
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
