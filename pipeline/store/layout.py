"""The store layout: THE contract between driver, worker, reader and report.

What a unioncam Zarr v3 store holds: every per-image array (name, dims, dtype, fill value),
the pool and metric names, the unit size (one unit = one shard of every array along
``image``), the completion markers' keys, and the store format version. :mod:`pipeline.store.io`
creates, writes and opens stores by this layout; nothing else decides an array's name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.decode import Status
from pipeline.data.manifest import unit_range

__all__ = [
    "STORE_FORMAT",
    "StoreFormatError",
    "check_format",
    "LAYOUT_ATTR",
    "MARKERS",
    "ArraySpec",
    "StoreError",
    "StoreLayout",
    "StoreMismatchError",
    "marker_key",
    "primary_method",
    "redact",
    "safe_name",
]

#: The store format this code writes and reads. 4: maps are stored at the layout's
#: ``map_size`` (the network input's side, or smaller with ``--map-size``), in inner chunks
#: of ``map_chunk`` rows (not one row: zarr's per-chunk cost of ~1-3 ms made a 1,024-row
#: shard cost seconds whatever its bytes), compressed with ``map_codec``. 3 (unioncam 0.3):
#: one-row inner chunks, maps at ``image_size``; a per-row ``uri`` array; several CAM
#: methods per store (``maps`` is the primary method's, ``methods/<name>`` every other's).
#: 2 (unioncam 0.2): arrays ``beta``, ``selection_score`` and ``target``. 1 (unioncam <
#: 0.2): ``scores``, ``selection_scores``, ``class_explained``.
STORE_FORMAT = 4
#: Which unioncam wrote each older format (named in the refusal).
_WRITTEN_BY = {1: "unioncam < 0.2", 2: "unioncam 0.2", 3: "unioncam 0.3"}
#: Raw bytes aimed at per inner chunk of a map array: ~2 MiB (16 rows of 224 px float16,
#: capped at 128 rows for small maps). Measured on 1,024 CAM-like maps (benchmarks/
#: bench_scale.py): fewer, larger chunks cut zarr's per-chunk overhead, while one row read
#: (``query row``, an overlay) still decodes at most ~2 MiB (a few ms).
MAP_CHUNK_BYTES = 2 << 20
MAX_MAP_CHUNK_ROWS = 128
#: The maps' compressor: Blosc with byte shuffle and zstd at level 1. Against level 5
#: (format 3) it writes a 224-px unit ~3-4x faster for ~10 % more bytes (bench_scale.py).
DEFAULT_MAP_CODEC = "zstd:1"
#: Root attribute holding the layout (what shapes/arrays the store has).
LAYOUT_ATTR = "unioncam_store"
MARKERS = "markers"
#: Longest per-row error message stored (messages are one line; this is a safety cap).
MAX_ERROR_CHARS = 500

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_SECRET_KEY = re.compile(
    r"(secret|passw|token|credential|private|session|api[_-]?key|access[_-]?key|"
    r"^key$|_key$|authorization|signature)",
    re.IGNORECASE,
)


class StoreError(ValueError):
    """The store path or a write is unusable; one line naming the store/unit/array."""


class StoreFormatError(StoreError):
    """A store written in another format version: refused, with what to do."""


def check_format(layout: Mapping[str, Any], name: str) -> None:
    """Refuse (one line) a stored layout dict whose format is not :data:`STORE_FORMAT`."""
    fmt = layout.get("format", 1)
    if fmt == STORE_FORMAT:
        return
    written = _WRITTEN_BY.get(fmt, "another unioncam version")
    raise StoreFormatError(
        f"store {name} has format {fmt} ({written}); this unioncam reads format "
        f"{STORE_FORMAT}: re-run into a new store or pass --overwrite"
    )


class StoreMismatchError(StoreError):
    """An existing store was made for another manifest/config/layout: refuse to mix."""


def primary_method(methods: tuple[str, ...] | list[str]) -> str:
    """The method whose map is ``maps`` and whose metrics have bare names: UnionCAM when
    it is among ``methods``, else the first (the one rule for driver, worker and reader)."""
    return "unioncam" if "unioncam" in methods else methods[0]


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
    #: Rows per inner chunk of a sharded array (maps: one shard per unit holds
    #: ``unit_size / inner`` chunks); 0: one plain chunk per unit.
    inner: int = 0
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return self.inner > 0

    def empty(self, rows: int) -> np.ndarray:
        """Fill-valued data for ``rows`` rows (what "not available" looks like)."""
        if self.dtype == "str":
            return np.full((rows, *self.trailing), self.fill, dtype=object)
        return np.full((rows, *self.trailing), self.fill, dtype=np.dtype(self.dtype))


def map_chunk_rows(unit_size: int, map_size: tuple[int, int]) -> int:
    """Rows per inner chunk of a map array: the largest divisor of ``unit_size`` (a shard
    must hold whole chunks) whose raw float16 bytes stay within :data:`MAP_CHUNK_BYTES`."""
    limit = max(1, min(MAX_MAP_CHUNK_ROWS, MAP_CHUNK_BYTES // (2 * map_size[0] * map_size[1])))
    return max(d for d in range(1, min(limit, unit_size) + 1) if unit_size % d == 0)


def parse_codec(text: str) -> tuple[str, int]:
    """``"zstd:1"`` -> ``("zstd", 1)``: a Blosc compressor and its level (one-line error)."""
    cname, _, level = str(text).partition(":")
    if cname not in ("zstd", "lz4", "lz4hc", "zlib", "blosclz") or not level.isdigit() \
            or not 0 <= int(level) <= 9:
        raise StoreError(f"map codec must be <blosc compressor>:<level 0-9> (e.g. "
                         f"{DEFAULT_MAP_CODEC}), got {text!r}")
    return cname, int(level)


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
    image_size: tuple[int, int]  # (h, w); an int is a square's side
    pool: tuple[str, ...]
    components: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    # The selection rule (e.g. "insdel-8", "beta"): what ``selection_score`` holds.
    selection: str = "beta"
    #: The CAM methods whose maps the store holds: :attr:`primary`'s in ``maps``, every
    #: other's in ``methods/<name>``.
    methods: tuple[str, ...] = ("unioncam",)
    #: The stored maps' (h, w): ``image_size`` (lossless) or smaller (``--map-size``,
    #: area-downsampled from the network-input map); ``None`` means ``image_size``.
    map_size: tuple[int, int] | None = None
    #: Rows per inner chunk of every map array; ``None``: :func:`map_chunk_rows`.
    map_chunk: int | None = None
    map_codec: str = DEFAULT_MAP_CODEC
    format: int = STORE_FORMAT

    def __post_init__(self) -> None:
        if isinstance(self.image_size, (int, np.integer)):  # a square input's side
            object.__setattr__(self, "image_size", (int(self.image_size), int(self.image_size)))
        if isinstance(self.map_size, (int, np.integer)):
            object.__setattr__(self, "map_size", (int(self.map_size), int(self.map_size)))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        for name in ("pool", "components", "metrics", "methods"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
        if "unioncam" not in self.methods and self.selection == "beta":
            object.__setattr__(self, "selection", "")  # no pool: nothing is selected
        if self.map_size is None:
            object.__setattr__(self, "map_size", tuple(self.image_size))
        if self.map_chunk is None:
            object.__setattr__(self, "map_chunk", map_chunk_rows(self.unit_size, self.map_size))
        for what, v in (("num_rows", self.num_rows), ("unit_size", self.unit_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise StoreError(f"{what} must be a positive integer, got {v!r}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise StoreError(
                f"image_size must be a positive int or (h, w), got {self.image_size!r}"
            )
        if len(self.map_size) != 2 or not 1 <= min(self.map_size) \
                or any(m > i for m, i in zip(self.map_size, self.image_size, strict=True)):
            raise StoreError(f"map_size must be positive and at most image_size "
                             f"{tuple(self.image_size)}, got {self.map_size!r}")
        if not 1 <= self.map_chunk <= self.unit_size or self.unit_size % self.map_chunk:
            raise StoreError(f"map_chunk must divide unit_size {self.unit_size}, "
                             f"got {self.map_chunk!r}")
        parse_codec(self.map_codec)
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise StoreError(f"methods must be non-empty unique names, got {list(self.methods)}")
        if self.has_pool and (not self.pool or len(set(self.pool)) != len(self.pool)):
            raise StoreError(f"pool must be non-empty unique names, got {list(self.pool)}")
        if not self.has_pool and (self.pool or self.components):
            raise StoreError("a pool and components need unioncam among the methods")
        if len(self.pool) > 32767:
            raise StoreError(f"pool has {len(self.pool)} members; at most 32767 are supported")
        for group, names in (("components", self.components), ("metrics", self.metrics)):
            safe = [safe_name(n) for n in names]
            if len(set(safe)) != len(safe) or any(not n for n in names):
                raise StoreError(f"{group} names must be unique and non-empty: {list(names)}")

    @property
    def has_pool(self) -> bool:
        """UnionCAM's arrays (pool, β, selection) exist: UnionCAM is one of the methods."""
        return "unioncam" in self.methods

    @property
    def primary(self) -> str:
        """The method a bare ``maps``/metric query means: UnionCAM if present, else the first."""
        return primary_method(self.methods)

    def maps_path(self, method: str | None = None) -> str:
        """The array holding ``method``'s maps (``None``: :attr:`primary`, in ``maps``)."""
        name = self.primary if method is None else method
        if name not in self.methods:
            raise StoreError(f"the store has no maps of method {name!r}; it has "
                             f"{', '.join(self.methods)}")  # fmt: skip
        return "maps" if name == self.primary else f"methods/{safe_name(name)}"

    @property
    def others(self) -> tuple[str, ...]:
        """The methods besides :attr:`primary` (maps in ``methods/<name>``)."""
        return tuple(m for m in self.methods if m != self.primary)

    @property
    def num_units(self) -> int:
        return -(-self.num_rows // self.unit_size)

    def unit_range(self, u: int) -> tuple[int, int]:
        """Row ids ``[start, stop)`` of unit ``u`` (= shard ``u`` of every array)."""
        try:
            return unit_range(int(u), unit_size=self.unit_size, num_rows=self.num_rows)
        except IndexError as e:
            raise StoreError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "num_rows": int(self.num_rows),
            "unit_size": int(self.unit_size),
            "image_size": [int(v) for v in self.image_size],
            "pool": list(self.pool),
            "components": list(self.components),
            "metrics": list(self.metrics),
            "selection": self.selection,
            "methods": list(self.methods),
            "map_size": [int(v) for v in self.map_size],
            "map_chunk": int(self.map_chunk),
            "map_codec": self.map_codec,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreLayout:
        return cls(
            num_rows=int(d["num_rows"]),
            unit_size=int(d["unit_size"]),
            image_size=(int(d["image_size"][0]), int(d["image_size"][1])),
            pool=tuple(d["pool"]),
            components=tuple(d.get("components", ())),
            metrics=tuple(d.get("metrics", ())),
            selection=str(d.get("selection") or ""),
            methods=tuple(d.get("methods") or ("unioncam",)),
            map_size=(tuple(int(v) for v in d["map_size"]) if d.get("map_size") else None),
            map_chunk=(int(d["map_chunk"]) if d.get("map_chunk") else None),
            map_codec=str(d.get("map_codec") or DEFAULT_MAP_CODEC),
            format=int(d.get("format", STORE_FORMAT)),
        )

    def arrays(self) -> list[ArraySpec]:
        """Every per-image array (the ones :func:`write_unit` writes), in a fixed order."""
        h, w = self.map_size
        k = self.map_chunk
        p = len(self.pool)
        sel_dtype = "i1" if p <= 127 else "i2"
        nan = float("nan")
        specs = [
            ArraySpec("maps", ("image", "y", "x"), "f2", nan, (h, w), inner=k,
                      attrs={"method": self.primary,
                             "description": f"{self.primary} map, [0,1], on the crop"
                                            + (" (the selected pool member's)"
                                               if self.has_pool else "")}),
        ]
        union = [
            ArraySpec("beta", ("image", "pool"), "f4", nan, (p,),
                      attrs={"pool": list(self.pool),
                             "description": "confidence gain of every pool member"}),
            ArraySpec("selected", ("image",), sel_dtype, -1,
                      attrs={"description": "index into pool of the selected map"}),
            ArraySpec("selection_score", ("image", "pool"), "f4", nan, (p,),
                      attrs={"pool": list(self.pool), "rule": self.selection,
                             "description": "every pool member's score under the selection "
                                            "rule; the highest is selected (-inf: a flat "
                                            "map, which a ranking rule cannot score)"}),
            ArraySpec("baseline_prob", ("image",), "f4", nan),
        ]
        specs += union if self.has_pool else []
        specs += [
            ArraySpec("target", ("image",), "i4", -1,
                      attrs={"description": "the class explained"}),
            ArraySpec("label", ("image",), "i4", -1, attrs={"description": "-1 = no label"}),
            ArraySpec("predicted", ("image",), "i4", -1),
            ArraySpec("prob", ("image",), "f4", nan),
            ArraySpec("orig_size", ("image", "hw"), "i4", -1, (2,),
                      attrs={"description": "upright original (h, w) in pixels"}),
            ArraySpec("crop_box", ("image", "box"), "i4", -1, (4,),
                      attrs={"description": "(left, top, right, bottom) in original pixels"}),
            ArraySpec("status", ("image",), "u1", int(Status.PENDING),
                      attrs={"codes": {s.name: int(s) for s in Status}}),
            ArraySpec("error", ("image",), "str", "",
                      attrs={"description": "one-line message for rows whose status != OK"}),
            ArraySpec("uri", ("image",), "str", "",
                      attrs={"description": "where the image was read from (query strings "
                                            "and credentials redacted); empty for inline bytes"}),
        ]  # fmt: skip
        for name in self.others:
            specs.append(
                ArraySpec(f"methods/{safe_name(name)}", ("image", "y", "x"), "f2", nan, (h, w),
                          inner=k, attrs={"name": name,
                                               "description": f"{name} map, [0,1], on the crop"})
            )  # fmt: skip
        for name in self.components:
            specs.append(
                ArraySpec(f"components/{safe_name(name)}", ("image", "y", "x"), "f2", nan, (h, w),
                          inner=k, attrs={"name": name})
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
                    for group, names in (("components", self.components), ("metrics", self.metrics),
                                         ("methods", self.others))
                    for name in names}  # fmt: skip
        return {original.get(spec.name, spec.name): spec.empty(n) for spec in self.arrays()}

    def aliases(self) -> dict[str, str]:
        """Accepted write_unit keys -> Zarr path (``components/<original name>`` too)."""
        out = {spec.name: spec.name for spec in self.arrays()}
        for n in self.components:
            out[f"components/{n}"] = f"components/{safe_name(n)}"
        for n in self.metrics:
            out[f"metrics/{n}"] = f"metrics/{safe_name(n)}"
        for n in self.others:
            out[f"methods/{n}"] = f"methods/{safe_name(n)}"
        return out


