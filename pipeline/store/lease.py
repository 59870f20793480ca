"""One driver per store: a lease object in the store, renewed by the driver that holds it.

Why: two drivers on one store both write the root attributes and both schedule the same
units; rows survive (writes are idempotent) but the recorded state and run summaries lie,
and two drivers with different settings could interleave. So :func:`pipeline.run.driver.run`
holds this lease from before it touches the store until after it finalised it.

The lease is the attributes of the Zarr group ``lease/`` (``lease/zarr.json``: a valid
node, so zarr and xarray see no stray object): ``host``, ``pid``, ``pid_start`` (the
process's start time, so a reused pid is not mistaken for the holder), ``started_at``,
``heartbeat`` (UNIX time, renewed every :data:`HEARTBEAT_S` seconds by a thread) and a random
``token`` identifying this holder. Rules:

* No lease: the driver creates it with an exclusive create (local: ``link(2)``, which fails
  when the name exists; S3: ``PUT`` with ``If-None-Match: *``). Two drivers starting at
  once: exactly one create succeeds.
* A live holder: refused, one line naming it (host, pid, since, heartbeat age).
* A dead holder is taken over with a warning: **at once** when it ran on this host and its
  process is gone (kill -9, then the same command again just works); otherwise once its
  heartbeat is older than :data:`TIMEOUT_S` seconds (a crashed machine cannot say it died).
  The takeover replaces the object conditionally (S3: ``If-Match`` on the stale lease's
  ETag, so of two drivers taking over at once exactly one wins); on a local path it is an
  atomic rename followed by a re-read after :data:`SETTLE_S` (the last writer wins and the
  other sees a foreign token and gives up).
* Renewal checks the token first: a driver that finds another holder's token has lost the
  lease (its heartbeat stalled past the timeout) and stops.
* Release (end of the run, also after an error or Ctrl-C) deletes the lease if it is ours.

Backends: local paths and S3 (including moto and MinIO, which implement ``If-None-Match``
and ``If-Match`` on ``PUT``) get the exclusive create. Any other fsspec backend (GCS, ...)
gets a plain write followed by a re-read after :data:`SETTLE_S`: two drivers starting
within that window can both see their own token only if the backend's reads are not
read-after-write consistent; the refusal of a second driver seconds or hours later, which is
the case that matters, holds on every backend.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from pipeline.data.location import is_local, normalise_location, redact_uri, url_to_fs
from pipeline.store.layout import MARKERS, StoreError

__all__ = [
    "HEARTBEAT_S",
    "LEASE",
    "TIMEOUT_S",
    "LeaseHeldError",
    "StoreLease",
    "describe_lease",
    "drop_from_consolidated",
    "read_lease",
    "refresh_consolidated",
]

log = logging.getLogger("unioncam.pipeline")

#: Key of the lease object, relative to the store root.
LEASE = "lease/zarr.json"
#: Seconds between heartbeats (``UNIONCAM_LEASE_HEARTBEAT_S`` overrides it).
HEARTBEAT_S = float(os.environ.get("UNIONCAM_LEASE_HEARTBEAT_S", "15"))
#: A lease whose heartbeat is older than this is dead, whatever host it came from
#: (``UNIONCAM_LEASE_TIMEOUT_S`` overrides it): 8 missed heartbeats.
TIMEOUT_S = float(os.environ.get("UNIONCAM_LEASE_TIMEOUT_S", "120"))
#: Seconds a driver waits before re-reading a lease it wrote without a conditional write.
SETTLE_S = 0.5


class LeaseHeldError(StoreError):
    """Another live driver holds the store's lease; the message names it (one line)."""


def _now_iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_gone(pid: int, start: str | None) -> bool:
    """True when no process ``pid`` runs here, or a different one (another start time)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        pass
    now = _pid_start(pid)
    return bool(start and now and now != start)


def describe_lease(lease: dict[str, Any], now: float | None = None) -> str:
    """``driver pid 123 on host-a since 2026-...Z, heartbeat 3 s ago`` (one line; an
    ``unioncam analyze`` holding the lease is named as such)."""
    now = time.time() if now is None else now
    beat = float(lease.get("heartbeat", 0))
    return (
        f"{lease.get('holder') or 'driver'} pid {lease.get('pid')} on {lease.get('host')} since "
        f"{lease.get('started_at')}, heartbeat {max(0.0, now - beat):.0f} s ago"
    )


def _dead_because(lease: dict[str, Any], timeout_s: float, now: float) -> str | None:
    """Why the holder of ``lease`` is dead, or None when it may be alive."""
    if lease.get("host") == socket.gethostname() and lease.get("pid"):
        if _process_gone(int(lease["pid"]), lease.get("pid_start")):
            return "its process is gone (same host)"
        return None  # alive here: never taken over, however old its heartbeat
    age = now - float(lease.get("heartbeat", 0))
    if age > timeout_s:
        return f"its heartbeat is {age:.0f} s old (timeout {timeout_s:.0f} s)"
    return None


# ---------------------------------------------------------------------------------------
# the object, on a local path or an fsspec URL
class _Backend:
    """Read / exclusive create / conditional replace / delete of the lease object."""

    def __init__(self, loc: str, storage_options: dict[str, Any] | None) -> None:
        self.local = is_local(loc)
        #: whether create/replace are atomic compare-and-set operations on this backend
        self.conditional = False
        if self.local:
            self.path = os.path.join(loc, *LEASE.split("/"))
        else:
            self.fs, root = url_to_fs(loc, storage_options)
            self.path = f"{root}/{LEASE}"
            proto = self.fs.protocol
            self.conditional = "s3" in (proto if isinstance(proto, (tuple, list)) else (proto,))

    def exclusive_create(self) -> bool:
        """Whether :meth:`create` is a true create-if-absent (no re-read needed)."""
        return self.local or self.conditional

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        """(lease attributes, version) or (None, None); version: S3 ETag / raw bytes."""
        try:
            if self.local:
                with open(self.path, "rb") as fh:
                    raw = fh.read()
                version: Any = raw
            else:
                self.fs.invalidate_cache(self.path)
                version = self.fs.info(self.path).get("ETag") if self.conditional else None
                raw = self.fs.cat_file(self.path)
                version = version or raw
        except FileNotFoundError:
            return None, None
        try:
            return dict(json.loads(raw).get("attributes", {}).get("lease") or {}), version
        except (ValueError, AttributeError):
            return {"host": "?", "pid": 0, "heartbeat": 0, "unreadable": True}, version

    def create(self, body: bytes) -> bool:
        """Create the object only if absent; False when it exists."""
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(body)
            try:
                os.link(tmp, self.path)  # atomic, fails if the name exists
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        if self.conditional:
            try:
                self.fs.pipe_file(self.path, body, mode="create")
                return True
            except (FileExistsError, OSError) as e:
                if _precondition_failed(e):
                    return False
                raise
        if self.read()[0] is not None:
            return False
        self.fs.pipe_file(self.path, body)
        return True

    def replace(self, body: bytes, version: Any) -> bool:
        """Overwrite the object if it is still ``version``; False when it changed."""
        if self.local:
            with open(self.path, "rb") as fh:
                if fh.read() != version:
                    return False
            tmp = f"{self.path}.{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(body)
            os.replace(tmp, self.path)  # atomic; the token re-read settles a race
            return True
        if self.conditional and isinstance(version, str):
            try:
                self.fs.pipe_file(self.path, body, IfMatch=version)
                return True
            except (FileExistsError, OSError) as e:
                if _precondition_failed(e):
                    return False
                raise
        self.fs.pipe_file(self.path, body)
        return True

    def delete(self) -> None:
        try:
            if self.local:
                os.remove(self.path)
                try:
                    os.rmdir(os.path.dirname(self.path))
                except OSError:
                    pass
            else:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


def _precondition_failed(e: BaseException) -> bool:
    """S3 answered 412 (If-None-Match / If-Match not met), however s3fs wrapped it."""
    if isinstance(e, FileExistsError):
        return True
    text = f"{e} {getattr(e, '__cause__', '')}"
    return "PreconditionFailed" in text or "412" in text or "At least one of the pre" in text


def read_lease(
    store_path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The store's lease (host, pid, started_at, heartbeat, ...), or None when free."""
    return _Backend(normalise_location(store_path), storage_options).read()[0]


def drop_from_consolidated(
    store_path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> None:
    """DRIVER ONLY, after consolidating: remove the lease and the completion markers from
    the consolidated metadata.

    Consolidation runs while the driver holds the lease, so its snapshot would show that
    driver as the holder long after it released the lease; the lease is only ever read from
    ``lease/zarr.json`` itself. Markers are always listed and read from the store
    (:func:`pipeline.store.units.done_units`), never from a snapshot, and with their object
    lists (~1 KB each) they would make the root ``zarr.json`` that every open reads grow by
    about 1 MB per 1,000 units.
    """
    loc = normalise_location(store_path)
    if is_local(loc):
        path = os.path.join(loc, "zarr.json")
        with open(path, "rb") as fh:
            root = json.loads(fh.read())
    else:
        fs, base = url_to_fs(loc, storage_options)
        path = f"{base}/zarr.json"
        root = json.loads(fs.cat_file(path))
    meta = (root.get("consolidated_metadata") or {}).get("metadata") or {}
    drop = [k for k in meta if k == LEASE.split("/")[0] or k.startswith(f"{MARKERS}/")]
    if not drop:
        return
    for k in drop:
        del meta[k]
    body = json.dumps(root, indent=2).encode()
    if is_local(loc):
        tmp = f"{path}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(body)
        os.replace(tmp, path)  # atomic: readers see the old or the new root, never half
    else:
        fs.pipe_file(path, body)


def refresh_consolidated(
    store_path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> None:
    """LEASE HOLDER ONLY, after writing nodes (``analyze``): consolidate the metadata again.

    Why: readers (and plain ``xr.open_zarr(path, group=...)``) use the root's consolidated
    snapshot, and a group created after the driver's last consolidation is missing from it
    (``KeyError: 'analysis' not found in consolidated metadata``). The lease and the markers
    are dropped from the new snapshot as after a run (:func:`drop_from_consolidated`).
    """
    import warnings

    import zarr

    from pipeline.store.io import open_store

    store = open_store(store_path, mode="r+", storage_options=storage_options).store
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(store)
    drop_from_consolidated(store_path, storage_options)


# ---------------------------------------------------------------------------------------
class StoreLease:
    """The lease a driver holds on a store while it runs.

    ``acquire()`` takes it (or raises :class:`LeaseHeldError`), and starts the heartbeat
    thread; calling it again re-checks that the lease is still ours and recreates it if the
    store was replaced meanwhile (``overwrite``). ``release()`` stops the heartbeat and
    deletes the lease. ``on_lost`` is called (from the heartbeat thread) with a one-line
    reason if another driver took the lease over.
    """

    def __init__(
        self,
        store_path: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        heartbeat_s: float | None = None,
        timeout_s: float | None = None,
        on_lost: Callable[[str], None] | None = None,
        holder: str = "driver",
    ) -> None:
        self.loc = normalise_location(store_path)
        self.holder = holder  # who holds it, for the refusal: "driver", "unioncam analyze"
        if is_local(self.loc):
            self.loc = os.path.abspath(self.loc)
        self.name = redact_uri(self.loc)
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else float(heartbeat_s)
        self.timeout_s = TIMEOUT_S if timeout_s is None else float(timeout_s)
        self.on_lost = on_lost
        self.token = secrets.token_hex(8)
        self.held = False
        self.lost: str | None = None
        self.took_over: str | None = None
        self._backend = _Backend(self.loc, storage_options)
        self._version: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()
        self._lock = threading.Lock()

    def _body(self, beat: float) -> bytes:
        lease = {
            "holder": self.holder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _pid_start(os.getpid()),
            "started_at": _now_iso(self._started),
            "heartbeat": round(beat, 3),
            "heartbeat_at": _now_iso(beat),
            "timeout_s": self.timeout_s,
            "token": self.token,
        }
        return json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": {"lease": lease}}, indent=1
        ).encode()

    def _mine(self) -> bool:
        cur, version = self._backend.read()
        if cur is not None and cur.get("token") == self.token:
            self._version = version
            return True
        return False

    def acquire(self) -> None:
        """Take the lease (or confirm we still hold it); refuse with one line if a live
        driver holds it. A dead holder's lease is taken over with a warning."""
        with self._lock:
            for _ in range(5):
                if self.held and self._mine():
                    return
                if self._backend.create(self._body(time.time())):
                    if self._backend.exclusive_create() or self._settled():
                        self._mine()
                        self._hold()
                        return
                    continue
                cur, version = self._backend.read()
                if cur is None:
                    continue  # released meanwhile: try to create again
                if cur.get("token") == self.token:
                    self._version = version
                    self._hold()
                    return
                now = time.time()
                why = _dead_because(cur, self.timeout_s, now)
                if why is None:
                    raise LeaseHeldError(
                        f"store {self.name} is in use by {describe_lease(cur, now)}; wait for "
                        f"it to finish or stop it (a driver on another host whose heartbeat "
                        f"is older than {self.timeout_s:.0f} s is taken over)"
                    )
                if self._backend.replace(self._body(time.time()), version) and self._settled():
                    self.took_over = f"{describe_lease(cur, now)}: {why}"
                    log.warning("store %s: taking over the lease of %s", self.name, self.took_over)
                    self._hold()
                    return
            raise LeaseHeldError(
                f"store {self.name}: could not take the driver lease (other drivers keep "
                "taking it); try again"
            )

    def _settled(self) -> bool:
        """Re-read after a short wait: is the token ours (last writer wins)?"""
        time.sleep(SETTLE_S)
        return self._mine()

    def _hold(self) -> None:
        self.held = True
        if self._thread is None and self.heartbeat_s > 0:
            self._thread = threading.Thread(
                target=self._beat, name="unioncam-lease", daemon=True
            )
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._lock:
                    if not self.held:
                        continue
                    cur, version = self._backend.read()
                    if cur is None:  # the store was replaced under us (--overwrite): renew
                        self._backend.create(self._body(time.time()))
                        continue
                    if cur.get("token") != self.token:
                        who = describe_lease(cur)
                        self.lost = f"store {self.name}: this driver lost its lease to {who}"
                        self.held = False
                        log.error("%s", self.lost)
                        if self.on_lost is not None:
                            self.on_lost(self.lost)
                        return
                    if self._backend.replace(self._body(time.time()), version):
                        self._mine()
            except Exception as e:  # a missed heartbeat is not fatal; the next one may work
                log.warning("store %s: lease heartbeat failed: %s", self.name, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (never raises)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if not self.held:
                return
            self.held = False
            try:
                if self._mine():
                    self._backend.delete()
            except Exception as e:  # the next driver takes a dead lease over anyway
                log.warning("store %s: could not release the lease: %s", self.name, e)
