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

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr

from pipeline.data.decode import Status
from pipeline.data.location import is_local, normalise_location, redact_uri, url_to_fs
from pipeline.store.layout import (
    LAYOUT_ATTR,
    MARKERS,
    ArraySpec,
    StoreError,
    StoreFormatError,
    StoreLayout,
    StoreMismatchError,
    check_format,
    redact,
)
from pipeline.store.units import array_kwargs, done_units, now, zstore

__all__ = [
    "create_store",
    "finalize_store",
    "open_store",
    "read_layout",
    "store_exists",
]



# ---------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------
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
            store = zstore(loc, storage_options, read_only=False)
            group = zarr.open_group(store, mode="r+", use_consolidated=False)
            group.update_attributes({**user_attrs, "resumed_at": now()})
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


def _create(
    loc: str,
    layout: StoreLayout,
    user_attrs: dict[str, Any],
    storage_options: dict[str, Any] | None,
) -> zarr.Group:
    store = zstore(loc, storage_options, read_only=False)
    root_attrs = {**user_attrs, LAYOUT_ATTR: layout.to_dict(), "created_at": now()}
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
        zarr.create_array(store, name=spec.name, **array_kwargs(spec, layout))

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
    store = zstore(loc, storage_options, read_only=(mode == "r"))
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
    store = zstore(loc, storage_options, read_only=False)
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
        "finalized_at": now(),
        **redact(dict(summary or {})),
    }
    group.update_attributes({"summary": info})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(store)
    return info


