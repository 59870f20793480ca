"""Verify a store against its completion markers, and repair it by removing bad markers.

Why: a marker says "this unit is done", and every query trusts it. A shard deleted or
truncated after the run (a failed sync, a bucket lifecycle rule, a disk fault) would stay
invisible until a query returned NaN. Each marker records every object its unit wrote
(key, size, CRC32C: :mod:`pipeline.store.checksum`) and the unit's row counts, so the store
can be checked against what was written:

* **fast** (default): one listing of the store; every recorded object must exist with its
  recorded size, every object recorded as *empty* (a chunk that was all fill value, so
  zarr wrote nothing) must be absent, the marker's counts must add up, and every array's
  metadata must exist.
* **deep** (``deep=True``): also re-reads every recorded object and compares its CRC32C,
  and checks that the per-row arrays agree with the marker: ``status`` counts equal the
  marker's ``by_status``; with UnionCAM in the run, OK rows have a selected pool member
  and the others have none.

A marker written before checksums existed (no ``objects`` field) cannot be checked for
objects: such a unit is reported as *unchecked* ("no checksums recorded"), not as bad;
``deep`` still checks its counts against the arrays.

``repair=True`` removes the markers of bad units (nothing else): the next run of the same
command then sees exactly those units as pending and rewrites them whole.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.decode import Status
from pipeline.data.location import is_local, normalise_location, redact_uri, url_to_fs
from pipeline.messages import error_line, ranges_text
from pipeline.store.checksum import CHECKSUM, checksum
from pipeline.store.io import open_store, read_layout
from pipeline.store.layout import StoreLayout, marker_key
from pipeline.store.units import read_markers

__all__ = ["VerifyReport", "remove_markers", "report_json", "verify_store"]

#: Objects read at once in deep mode (object-store latency hides behind concurrency).
READ_THREADS = 16


@dataclass
class VerifyReport:
    """What :func:`verify_store` found. ``ok`` is true when no unit (and nothing of the
    store's own metadata) is bad; unchecked units do not make a store bad."""

    store: str
    deep: bool
    units_checked: int = 0
    objects_checked: int = 0
    bytes_read: int = 0
    #: unit -> one-line reason (the first problem found; ``problems`` counts them all)
    bad: dict[int, str] = field(default_factory=dict)
    problems: dict[int, int] = field(default_factory=dict)
    #: units whose marker records no checksums (written by unioncam before they existed)
    unchecked: list[int] = field(default_factory=list)
    #: problems of the store itself (array metadata missing): nothing a rerun can fix
    store_problems: list[str] = field(default_factory=list)
    #: units whose markers ``repair`` removed
    repaired: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad and not self.store_problems

    def lines(self) -> list[str]:
        """One line per bad unit (and per store problem), then a summary line."""
        out = [f"store {self.store}: {p}" for p in self.store_problems]
        for u in sorted(self.bad):
            more = self.problems.get(u, 1) - 1
            out.append(f"BAD unit {u}: {self.bad[u]}" + (f" (and {more} more)" if more else ""))
        if self.unchecked:
            out.append(
                f"{len(self.unchecked)} units have no checksums recorded (written by an older "
                f"unioncam), their objects were not checked: units {ranges_text(self.unchecked, sep=',')}"
            )
        mode = "deep (sizes, CRC32C, row counts)" if self.deep else "fast (listing: sizes)"
        out.append(
            f"verified {self.units_checked} units, {self.objects_checked} objects, {mode}, in "
            f"{self.seconds:.2f} s: {len(self.bad)} bad"
            + (f", {self.bytes_read / 1e6:.1f} MB read" if self.deep else "")
        )
        if self.repaired:
            out.append(
                f"removed the markers of {len(self.repaired)} bad units ({ranges_text(self.repaired, sep=',')}); "
                "rerun the same 'unioncam run' command to redo exactly those"
            )
        elif self.bad:
            out.append("run 'unioncam verify --repair' to mark them for redoing")
        return out


# ---------------------------------------------------------------------------------------
# storage access (local paths and fsspec URLs)
class _Objects:
    """Sizes and bytes of a store's objects, by key relative to the store root."""

    def __init__(self, loc: str, storage_options: dict[str, Any] | None) -> None:
        self.loc = loc
        self.local = is_local(loc)
        if self.local:
            self.root = loc
            self.fs = None
            self._sizes: dict[str, int] | None = None
        else:
            self.fs, self.root = url_to_fs(loc, storage_options)
            self.fs.invalidate_cache(self.root)
            # One recursive listing of the whole store (1,000 keys per request on S3).
            found = self.fs.find(self.root, detail=True)
            n = len(self.root.rstrip("/")) + 1
            self._sizes = {p[n:]: int(info.get("size") or 0) for p, info in found.items()}

    def size(self, key: str) -> int | None:
        if self._sizes is not None:
            return self._sizes.get(key)
        try:
            return os.stat(os.path.join(self.root, *key.split("/"))).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read(self, key: str) -> bytes:
        if self.local:
            with open(os.path.join(self.root, *key.split("/")), "rb") as fh:
                return fh.read()
        return self.fs.cat_file(f"{self.root}/{key}")


# ---------------------------------------------------------------------------------------
def verify_store(
    store_path: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    deep: bool = False,
    repair: bool = False,
) -> VerifyReport:
    """Check every unit that has a completion marker against what its marker records.

    Returns a :class:`VerifyReport` (``report.ok``, ``report.bad``: unit -> one-line
    reason). With ``repair``, the markers of bad units are removed afterwards so that the
    same ``unioncam run`` command redoes exactly those units. Read-only otherwise; safe
    while a run is writing (units finished meanwhile are simply not checked).
    """
    t0 = time.perf_counter()
    loc = normalise_location(store_path)
    layout = read_layout(loc, storage_options)
    report = VerifyReport(store=redact_uri(loc), deep=deep)
    markers = read_markers(loc, storage_options)
    objects = _Objects(loc, storage_options)
    for spec in layout.arrays():
        if objects.size(f"{spec.name}/zarr.json") is None:
            report.store_problems.append(f"array {spec.name!r} has no metadata (zarr.json)")

    def bad(u: int, reason: str) -> None:
        report.problems[u] = report.problems.get(u, 0) + 1
        report.bad.setdefault(u, reason)

    to_read: list[tuple[int, str, dict[str, Any]]] = []
    for u, m in sorted(markers.items()):
        report.units_checked += 1
        for reason in _marker_problems(u, m, layout):
            bad(u, reason)
        recorded = m.get("objects")
        if not isinstance(recorded, dict):
            report.unchecked.append(u)
            continue
        for key, entry in recorded.items():
            report.objects_checked += 1
            size = objects.size(key)
            if size is None:
                bad(u, f"{key} is missing")
            elif size != int(entry.get("size", -1)):
                bad(u, f"{key} has {size} bytes, {entry.get('size')} were written")
            elif deep:
                to_read.append((u, key, entry))
        for key in m.get("empty") or ():
            if objects.size(key) is not None:
                bad(u, f"{key} exists but was written empty (all fill value)")

    if deep:
        def check(item: tuple[int, str, dict[str, Any]]) -> tuple[int, int, str | None]:
            u, key, entry = item
            try:
                raw = objects.read(key)
            except Exception as e:
                return u, 0, f"{key} cannot be read: {error_line(e)}"
            want, got = entry.get(CHECKSUM), checksum(raw)
            if want != got:
                return u, len(raw), f"{key} has {CHECKSUM} {got}, {want} was written"
            return u, len(raw), None

        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            for u, n, problem in pool.map(check, to_read):
                report.bytes_read += n
                if problem:
                    bad(u, problem)
        for u, reason in _row_problems(loc, storage_options, layout, markers):
            bad(u, reason)

    if repair and report.bad:
        remove_markers(loc, sorted(report.bad), storage_options)
        report.repaired = sorted(report.bad)
    report.seconds = time.perf_counter() - t0
    return report


def _marker_problems(u: int, m: dict[str, Any], layout: StoreLayout) -> list[str]:
    """The marker's own consistency: readable, its unit's row range, counts that add up."""
    if m.get("unreadable"):
        return ["its marker is not valid JSON"]
    try:
        start, stop = layout.unit_range(u)
    except ValueError as e:
        return [f"its marker names a unit outside the store: {e}"]
    rows = m.get("rows")
    if rows != stop - start or m.get("start", start) != start:
        return [f"its marker records rows {m.get('start')}-{m.get('stop')} ({rows}), "
                f"the unit is rows {start}-{stop}"]  # fmt: skip
    by_status = m.get("by_status") or {}
    if sum(int(v) for v in by_status.values()) != rows:
        return [f"its marker's counts by status add up to {sum(by_status.values())}, not {rows}"]
    if "ok" in m and int(m["ok"]) != int(by_status.get("OK", 0)):
        return [f"its marker records ok={m['ok']} but OK={by_status.get('OK', 0)}"]
    return []


def _row_problems(
    loc: str,
    storage_options: dict[str, Any] | None,
    layout: StoreLayout,
    markers: dict[int, dict[str, Any]],
) -> list[tuple[int, str]]:
    """Per-row arrays against the markers: ``status`` counts and ``selected``.

    Read whole (1 byte per row each: 1.3 MB for ImageNet-train), which lets zarr fetch
    every chunk concurrently instead of one request per unit."""
    group = open_store(loc, mode="r", storage_options=storage_options)
    out: list[tuple[int, str]] = []
    try:
        status = np.asarray(group["status"][:])
        # UnionCAM's pool arrays exist only when the run had UnionCAM
        selected = np.asarray(group["selected"][:]) if layout.has_pool else None
    except Exception as e:
        reason = f"its rows cannot be decoded: {error_line(e)}"
        return [(u, reason) for u in markers]
    names = {int(s): s.name for s in Status}
    pool = len(layout.pool)
    for u, m in sorted(markers.items()):
        if m.get("unreadable"):
            continue
        start, stop = layout.unit_range(u)
        st = status[start:stop]
        vals, cnt = np.unique(st, return_counts=True)
        counts = {names.get(int(v), str(int(v))): int(c) for v, c in zip(vals, cnt, strict=True)}
        recorded = {k: int(v) for k, v in (m.get("by_status") or {}).items() if int(v)}
        if counts != recorded:
            out.append((u, f"status counts {_fmt(counts)} differ from its marker's {_fmt(recorded)}"))
            continue
        if selected is None:
            continue
        sel = selected[start:stop]
        ok = st == int(Status.OK)
        wrong = int(np.count_nonzero(ok & ((sel < 0) | (sel >= pool))))
        wrong += int(np.count_nonzero(~ok & (sel != -1)))
        if wrong:
            out.append((u, f"{wrong} rows have a selected member that disagrees with their status"))
    return out


def _fmt(counts: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


def remove_markers(
    store_path: str | os.PathLike[str],
    units: Iterable[int],
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Delete the completion markers of ``units``: the next run redoes them whole.

    Only markers are touched: a unit's old shards stay until it is rewritten (a marker-less
    unit is "not done" whatever its chunks hold), so nothing is lost if the rerun never comes.
    """
    loc = normalise_location(store_path)
    units = list(units)
    if is_local(loc):
        for u in units:
            d = os.path.join(loc, *marker_key(u).split("/"))
            try:
                os.remove(os.path.join(d, "zarr.json"))
                os.rmdir(d)
            except FileNotFoundError:
                pass
        return
    fs, root = url_to_fs(loc, storage_options)
    paths = [f"{root}/{marker_key(u)}/zarr.json" for u in units]
    if paths:
        fs.rm(paths)
    fs.invalidate_cache(f"{root}/markers")


def report_json(report: VerifyReport) -> str:
    """The report as JSON (``unioncam verify --json``)."""
    d = dict(report.__dict__)
    d["ok"] = report.ok
    return json.dumps(d, indent=1, default=str)
