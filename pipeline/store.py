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

import datetime as _dt
import json
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .decode import Status, is_local, local_path, redact_uri

__all__ = [
    "FORMAT_VERSION",
    "LAYOUT_ATTR",
    "ArraySpec",
    "StoreError",
    "StoreLayout",
    "StoreMismatchError",
    "create_store",
    "safe_name",
    "done_units",
    "finalize_store",
    "marker_key",
    "open_store",
    "read_layout",
    "read_markers",
    "redact",
    "write_unit",
]

FORMAT_VERSION = 1
#: Root attribute holding the layout (what shapes/arrays the store has).
LAYOUT_ATTR = "unioncam_store"
MARKERS = "markers"
#: Longest per-row error message stored (messages are one line; this is a safety cap).
MAX_ERROR_CHARS = 500

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_MARKER_RE = re.compile(r"^unit-(\d+)$")
_SECRET_KEY = re.compile(
    r"(secret|passw|token|credential|private|session|api[_-]?key|access[_-]?key|"
    r"^key$|_key$|authorization|signature)",
    re.IGNORECASE,
)
#: Maps compress ~1.5x better with byte-shuffle + zstd than with zarr's default zstd
#: (measured on smooth float16 CAM-like maps: ratio 2.40 vs 1.60).
_MAP_CODEC = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


class StoreError(ValueError):
    """The store path or a write is unusable; one line naming the store/unit/array."""


class StoreMismatchError(StoreError):
    """An existing store was made for another manifest/config/layout: refuse to mix."""


def marker_key(u: int) -> str:
    """Key (relative to the store root) of unit ``u``'s completion marker group."""
    return f"{MARKERS}/unit-{u:06d}"


def redact(obj: Any) -> Any:
    """A JSON-safe copy of ``obj`` with credential-like keys blanked (defence in depth:
    ``storage_options`` should never be passed here at all)."""
    if isinstance(obj, Mapping):
        return {
            str(k): (
                "<redacted>" if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        if isinstance(obj, float) and not np.isfinite(obj):
            return None
        return obj
    if isinstance(obj, np.generic):
        return redact(obj.item())
    return str(obj)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArraySpec:
    """One per-image array: ``name`` is its Zarr path; trailing dims follow ``image``."""

    name: str
    dims: tuple[str, ...]
    dtype: str  # numpy dtype string, or "str" for variable-length UTF-8
    fill: Any
    trailing: tuple[int, ...] = ()
    sharded: bool = False  # inner chunk = one image (maps); else one chunk per unit
    attrs: dict[str, Any] = field(default_factory=dict)

    def empty(self, rows: int) -> np.ndarray:
        """Fill-valued data for ``rows`` rows (what "not available" looks like)."""
        if self.dtype == "str":
            return np.full((rows, *self.trailing), self.fill, dtype=object)
        return np.full((rows, *self.trailing), self.fill, dtype=np.dtype(self.dtype))


def safe_name(name: str) -> str:
    """The array key a component or metric name is stored under (``fused:a+b`` -> ``fused_a_b``):
    pool names hold characters that are path separators or awkward in Zarr keys; the original
    name stays in the array's ``name`` attribute."""
    return _SAFE_NAME.sub("_", name)


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and names of a store; saved in the root attribute ``unioncam_store``."""

    num_rows: int
    unit_size: int
    map_size: tuple[int, int]
    pool: tuple[str, ...]
    components: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    # The selection rule when it is not β (e.g. "insdel-8"): its scores get their own array,
    # because ``scores`` always holds β. None for β (nothing extra to store).
    selection: str | None = None
    format: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.selection == "beta":  # β is ``scores`` itself: nothing extra to store
            object.__setattr__(self, "selection", None)
        for what, v in (("num_rows", self.num_rows), ("unit_size", self.unit_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise StoreError(f"{what} must be a positive integer, got {v!r}")
        if len(self.map_size) != 2 or min(self.map_size) < 1:
            raise StoreError(f"map_size must be a positive int or (h, w), got {self.map_size!r}")
        if not self.pool or len(set(self.pool)) != len(self.pool):
            raise StoreError(f"pool must be non-empty unique names, got {list(self.pool)}")
        if len(self.pool) > 32767:
            raise StoreError(f"pool has {len(self.pool)} members; at most 32767 are supported")
        for group, names in (("components", self.components), ("metrics", self.metrics)):
            safe = [safe_name(n) for n in names]
            if len(set(safe)) != len(safe) or any(not n for n in names):
                raise StoreError(f"{group} names must be unique and non-empty: {list(names)}")

    @property
    def num_units(self) -> int:
        return -(-self.num_rows // self.unit_size)

    def unit_range(self, u: int) -> tuple[int, int]:
        if not 0 <= u < self.num_units:
            raise StoreError(f"unit {u} out of range 0..{self.num_units - 1}")
        start = u * self.unit_size
        return start, min(start + self.unit_size, self.num_rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "num_rows": int(self.num_rows),
            "unit_size": int(self.unit_size),
            "map_size": [int(v) for v in self.map_size],
            "pool": list(self.pool),
            "components": list(self.components),
            "metrics": list(self.metrics),
            "selection": self.selection,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreLayout:
        return cls(
            num_rows=int(d["num_rows"]),
            unit_size=int(d["unit_size"]),
            map_size=(int(d["map_size"][0]), int(d["map_size"][1])),
            pool=tuple(d["pool"]),
            components=tuple(d.get("components", ())),
            metrics=tuple(d.get("metrics", ())),
            selection=d.get("selection"),
            format=int(d.get("format", FORMAT_VERSION)),
        )

    def arrays(self) -> list[ArraySpec]:
        """Every per-image array (the ones :func:`write_unit` writes), in a fixed order."""
        h, w = self.map_size
        p = len(self.pool)
        sel_dtype = "i1" if p <= 127 else "i2"
        nan = float("nan")
        specs = [
            ArraySpec("maps", ("image", "y", "x"), "f2", nan, (h, w), sharded=True,
                      attrs={"description": "selected UnionCAM map, [0,1], on the crop"}),
            ArraySpec("scores", ("image", "pool"), "f4", nan, (p,),
                      attrs={"pool": list(self.pool),
                             "description": "confidence gain of every pool member"}),
            ArraySpec("selected", ("image",), sel_dtype, -1,
                      attrs={"description": "index into pool of the selected map"}),
            *([ArraySpec("selection_scores", ("image", "pool"), "f4", nan, (p,),
                         attrs={"pool": list(self.pool), "rule": self.selection,
                                "description": "every pool member's score under the selection "
                                               "rule; the highest is selected (-inf: a flat "
                                               "map, which a ranking rule cannot score)"})]
              if self.selection else []),
            ArraySpec("class_explained", ("image",), "i4", -1),
            ArraySpec("label", ("image",), "i4", -1, attrs={"description": "-1 = no label"}),
            ArraySpec("predicted", ("image",), "i4", -1),
            ArraySpec("prob", ("image",), "f4", nan),
            ArraySpec("baseline_prob", ("image",), "f4", nan),
            ArraySpec("orig_size", ("image", "hw"), "i4", -1, (2,),
                      attrs={"description": "upright original (h, w) in pixels"}),
            ArraySpec("crop_box", ("image", "box"), "i4", -1, (4,),
                      attrs={"description": "(left, top, right, bottom) in original pixels"}),
            ArraySpec("status", ("image",), "u1", int(Status.PENDING),
                      attrs={"codes": {s.name: int(s) for s in Status}}),
            ArraySpec("error", ("image",), "str", "",
                      attrs={"description": "one-line message for rows whose status != OK"}),
        ]  # fmt: skip
        for name in self.components:
            specs.append(
                ArraySpec(f"components/{safe_name(name)}", ("image", "y", "x"), "f2", nan, (h, w),
                          sharded=True, attrs={"name": name})
            )  # fmt: skip
        for name in self.metrics:
            specs.append(
                ArraySpec(f"metrics/{safe_name(name)}", ("image",), "f4", nan, attrs={"name": name})
            )
        return specs

    def empty_rows(self, n: int) -> dict[str, np.ndarray]:
        """Fill-valued arrays for ``n`` rows, keyed as :func:`write_unit` accepts them
        (components and metrics by their original names); a worker fills in what it
        computed, and everything else stays "not available"."""
        original = {f"{group}/{safe_name(name)}": f"{group}/{name}"
                    for group, names in (("components", self.components), ("metrics", self.metrics))
                    for name in names}  # fmt: skip
        return {original.get(spec.name, spec.name): spec.empty(n) for spec in self.arrays()}

    def _aliases(self) -> dict[str, str]:
        """Accepted write_unit keys -> Zarr path (``components/<original name>`` too)."""
        out = {spec.name: spec.name for spec in self.arrays()}
        for n in self.components:
            out[f"components/{n}"] = f"components/{safe_name(n)}"
        for n in self.metrics:
            out[f"metrics/{n}"] = f"metrics/{safe_name(n)}"
        return out


# ---------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------
def _loc(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    if is_local(path):
        return os.path.abspath(local_path(path))
    return path.rstrip("/")


def _fs(loc: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(loc, **(storage_options or {}))
    return fs, root.rstrip("/")


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
            fs, root = _fs(loc, storage_options)
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
    fs, root = _fs(loc, storage_options)
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
    fs, root = _fs(loc, storage_options)
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
    return StoreLayout.from_dict(raw)


def read_layout(
    store_path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> StoreLayout:
    """The layout of an existing store (one small read)."""
    loc = _loc(store_path)
    meta = _read_root_json(loc, storage_options)
    if meta is None:
        raise StoreError(f"no unioncam store at {redact_uri(loc)}")
    return _layout_of(meta, loc)


# ---------------------------------------------------------------------------------------------
# Driver: create / open / finalize
# ---------------------------------------------------------------------------------------------
def _fingerprints(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k.endswith("fingerprint")}


def _short(v: Any, n: int = 40) -> str:
    s = str(v)
    return s[: n - 3] + "..." if len(s) > n else s


def create_store(
    path: str | os.PathLike[str],
    *,
    num_rows: int,
    unit_size: int,
    map_size: int | tuple[int, int],
    pool: Sequence[str],
    components: Sequence[str] = (),
    metrics: Sequence[str] = (),
    selection: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create the store (DRIVER ONLY), or reuse a matching one to resume.

    An existing store is reused when its layout (rows, unit size, map size, pool,
    components, metrics, selection rule; a store without ``selection_scores`` matches any rule
    and keeps none) and every ``*fingerprint`` key of ``attrs`` (e.g.
    ``manifest_fingerprint``, ``config_fingerprint``) equal the stored ones; its attributes
    are then updated with ``attrs``. Otherwise :class:`StoreMismatchError` (one line) unless
    ``overwrite``, which deletes the old store, markers included. A path that holds
    something that is not a unioncam store is never deleted or written into.
    """
    size = (
        (int(map_size), int(map_size))
        if isinstance(map_size, (int, np.integer))
        else tuple(map_size)
    )
    layout = StoreLayout(
        num_rows=int(num_rows),
        unit_size=int(unit_size),
        map_size=(int(size[0]), int(size[1])),
        pool=tuple(str(p) for p in pool),
        components=tuple(str(c) for c in components),
        metrics=tuple(str(m) for m in metrics),
        selection=None if selection in (None, "beta") else str(selection),
    )
    user_attrs = redact(dict(attrs or {}))
    if LAYOUT_ATTR in user_attrs:
        raise StoreError(f"attrs must not contain the reserved key {LAYOUT_ATTR!r}")
    loc = _loc(path)
    name = redact_uri(loc)
    meta = _read_root_json(loc, storage_options)
    if meta is not None:
        try:
            old_layout = _layout_of(meta, loc)
        except StoreError:
            raise StoreMismatchError(
                f"{name} exists and is not a unioncam store; refusing to overwrite it"
            ) from None
        old_attrs = meta.get("attributes") or {}
        problem = _mismatch(old_layout, layout, old_attrs, user_attrs)
        if problem is None:
            store = _zstore(loc, storage_options, read_only=False)
            group = zarr.open_group(store, mode="r+", use_consolidated=False)
            group.update_attributes({**user_attrs, "resumed_at": _now()})
            return group
        if not overwrite:
            raise StoreMismatchError(
                f"store {name} was made for a different run ({problem}); use another store "
                "path, or overwrite=True to delete it"
            )
        _delete(loc, storage_options)
    elif _is_nonempty(loc, storage_options):
        raise StoreMismatchError(
            f"{name} exists and is not a Zarr store; refusing to write into it"
        )
    return _create(loc, layout, user_attrs, storage_options)


def _mismatch(
    old: StoreLayout, new: StoreLayout, old_attrs: Mapping[str, Any], new_attrs: Mapping[str, Any]
) -> str | None:
    od, nd = old.to_dict(), new.to_dict()
    if od.get("selection") is None:
        # A store made before ``selection_scores`` existed (or a β run): it simply has no such
        # array; the config fingerprint below still refuses another selection rule.
        nd["selection"] = None
    for key in nd:
        if od.get(key) != nd[key]:
            return f"{key}: store has {_short(od.get(key))}, this run {_short(nd[key])}"
    old_fp, new_fp = _fingerprints(old_attrs), _fingerprints(new_attrs)
    for key in sorted(set(old_fp) | set(new_fp)):
        if old_fp.get(key) != new_fp.get(key):
            a, b = _short(old_fp.get(key), 15), _short(new_fp.get(key), 15)
            return f"{key}: store has {a}, this run {b}"
    return None


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
    n, unit = layout.num_rows, layout.unit_size
    for sub, names in (("components", layout.components), ("metrics", layout.metrics)):
        if names:
            zarr.open_group(store, path=sub, mode="w")
    zarr.open_group(
        store,
        path=MARKERS,
        mode="w",
        attributes={"description": "one group per finished unit (unit-NNNNNN), written last"},
    )

    def make(spec: ArraySpec) -> None:
        kwargs: dict[str, Any] = {}
        if spec.sharded:
            kwargs["chunks"] = (1, *spec.trailing)
            kwargs["shards"] = (unit, *spec.trailing)
            kwargs["compressors"] = _MAP_CODEC
        else:
            kwargs["chunks"] = (unit, *spec.trailing)
        zarr.create_array(
            store,
            name=spec.name,
            shape=(n, *spec.trailing),
            dtype=str if spec.dtype == "str" else spec.dtype,
            fill_value=spec.fill,
            dimension_names=spec.dims,
            attributes=redact(spec.attrs),
            **kwargs,
        )

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
        ("pool", np.array(layout.pool, dtype=object), ""),
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
    loc = _loc(path)
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
    loc = _loc(store_path)
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


def write_unit(
    store_path: str | os.PathLike[str],
    u: int,
    arrays: Mapping[str, Any],
    storage_options: dict[str, Any] | None = None,
    *,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """WORKER: write every array's rows of unit ``u`` (whole shards), then its marker.

    ``arrays`` maps array names (``maps``, ``scores``, ``status``, ...,
    ``components/<name>``, ``metrics/<name>``) to ``(rows, ...)`` arrays for this unit;
    ``status`` and ``maps`` are required, every other array not given is written with its
    fill value ("not available"), so rewriting a unit always yields the same store
    (idempotent: an actor may die after writing and the unit be retried). ``info`` adds
    fields to the marker (e.g. ``seconds`` spent, ``attempt``). Returns the marker dict.
    Never touches metadata: arrays are opened, not created.
    """
    t0 = time.perf_counter()
    loc = _loc(store_path)
    layout = read_layout(loc, storage_options)
    start, stop = layout.unit_range(int(u))
    rows = stop - start
    aliases = layout._aliases()
    unknown = sorted(k for k in arrays if k not in aliases)
    if unknown:
        raise StoreError(
            f"write_unit(unit {u}): unknown array(s) {unknown}; known: {sorted(set(aliases))}"
        )
    given = {aliases[k]: v for k, v in arrays.items()}
    for required in ("status", "maps"):
        if required not in given:
            raise StoreError(f"write_unit(unit {u}): array {required!r} is required")
    specs = layout.arrays()
    data = {
        s.name: _prepare(s, given[s.name], rows, u) if s.name in given else s.empty(rows)
        for s in specs
    }
    status = data["status"]
    valid = {int(s) for s in Status if s is not Status.PENDING}
    bad = sorted(set(np.unique(status).tolist()) - valid)
    if bad:
        raise StoreError(
            f"write_unit(unit {u}): status has invalid code(s) {bad} (PENDING=255 means "
            "'never processed' and cannot be written)"
        )
    store = _zstore(loc, storage_options, read_only=False)

    def put(spec: ArraySpec) -> None:
        arr = zarr.open_array(store, path=spec.name, mode="r+", zarr_format=3)
        arr[start:stop] = data[spec.name]

    # Arrays are independent objects: write them concurrently (object-store latency
    # dominates remote writes; zarr runs all of it on its one event loop).
    with ThreadPoolExecutor(max_workers=min(8, len(specs))) as pool:
        list(pool.map(put, specs))
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
    }
    _write_marker(loc, int(u), marker, storage_options)
    return marker


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
        with open(tmp, "wb") as fh:
            fh.write(body)
        os.replace(tmp, final)  # atomic: a marker is either absent or complete
    else:
        fs, root = _fs(loc, storage_options)
        fs.pipe_file(f"{root}/{key}", body)  # one PUT: atomic on object stores


def done_units(
    store_path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> set[int]:
    """Units whose completion marker exists (one listing; never inferred from chunks)."""
    loc = _loc(store_path)
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
    fs, root = _fs(loc, storage_options)
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
    loc = _loc(store_path)
    units = sorted(done_units(loc, storage_options))
    keys = [f"{marker_key(u)}/zarr.json" for u in units]
    if is_local(loc):
        raw = {}
        for u, key in zip(units, keys, strict=True):
            with open(os.path.join(loc, *key.split("/")), "rb") as fh:
                raw[u] = fh.read()
    else:
        fs, root = _fs(loc, storage_options)
        got = fs.cat([f"{root}/{k}" for k in keys]) if keys else {}
        raw = {u: got[f"{root}/{k}"] for u, k in zip(units, keys, strict=True)}
    out = {}
    for u, body in raw.items():
        try:
            out[u] = json.loads(body).get("attributes", {})
        except ValueError:
            out[u] = {"unit": u, "unreadable": True}
    return out
