"""The driver: validates, creates the store, schedules units over Ray actors, reports.

Why it is built this way:

* **Driver owns metadata.** The store (every array pre-sized to N rows) is created here,
  before any actor starts; actors only write whole shards of their own units plus a marker
  (zarr 3.1 loses data when two processes write one shard, and metadata written by many
  processes races). Consolidation at the end is also done here.
* **Exactly-once by markers.** Pending units are "all units minus those with a completion
  marker" (never inferred from chunk existence), so rerunning the same command resumes,
  and a finished store does no work. The store refuses a different configuration or
  manifest (fingerprints in its attributes) unless ``overwrite``.
* **Dynamic pull.** Each actor holds at most two units (one being explained, one being
  decoded/written); when one finishes it gets the next pending unit, so a slow actor
  simply takes fewer units.
* **Faults.** An actor that dies (``os._exit``, OOM kill, node loss) is replaced and the
  unit it was running is retried; the units queued behind it are re-queued without
  spending an attempt. A unit that fails more than ``max_retries`` times is reported at the
  end (``RunSummary.failed_units``), never dropped silently. Ctrl-C kills the actors and
  leaves a store that the same command completes.
* **Memory stays flat.** Per-unit state lives only while the unit is in flight; the driver
  keeps per-actor aggregates, never per-row data, so an ImageNet-train run (1,252 units of
  1,024 rows) or a 100k-unit run costs the driver the same RSS.
"""


from __future__ import annotations

import logging
import os
import time
from typing import Any

from pipeline.config import RunConfig
from pipeline.messages import error_line
from pipeline.run.plan import UnitContext, resolve, run_state, store_attrs
from pipeline.run.scheduler import Scheduler, note, ray_error_line
from pipeline.run.signals import Stopped, reinstall, stop_on_signals, stopped_line, why_stopped
from pipeline.run.summary import RunSummary

__all__ = ["RunSummary", "run"]

log = logging.getLogger("unioncam.pipeline")


# ---------------------------------------------------------------------------------------
# the run
@stop_on_signals()  # SIGTERM / SIGHUP stop the run as Ctrl-C does (pipeline.run.signals)
def run(config: RunConfig) -> RunSummary:
    """Run (or resume) the job described by ``config``; return its summary.

    One driver per store: the run holds the store's lease (:mod:`pipeline.store.lease`)
    from before it touches the store until it has finalised it; a second driver is refused
    with :class:`~pipeline.store.lease.LeaseHeldError` (one line naming the holder).
    """
    from pipeline.store.io import store_exists
    from pipeline.store.lease import StoreLease

    so = config.storage_options or None
    lease = StoreLease(config.store, so, on_lost=_lease_lost)
    try:
        if store_exists(config.store, storage_options=so):
            lease.acquire()  # first: refuse before any work, and before the store is touched
        return _run(config, lease)
    except KeyboardInterrupt:
        if lease.lost:
            raise RuntimeError(lease.lost) from None
        raise
    finally:
        lease.release()


def _lease_lost(reason: str) -> None:
    """Another driver took this store over: stop this one now (as Ctrl-C would)."""
    import _thread

    note(reason)
    _thread.interrupt_main()


def _run(config: RunConfig, lease: Any) -> RunSummary:
    """Run (or resume) the job described by ``config``; return its summary.

    Callable from Python (``ray submit`` scripts pass ``address="auto"``). Uses the Ray
    instance already initialised in this process if there is one; else connects to
    ``config.address`` or starts a local one (and shuts down only what it started).
    Raises ``ValueError`` (one line) for bad settings, manifests or mismatching stores,
    ``KeyboardInterrupt`` after a clean stop on Ctrl-C.
    """
    from pipeline.data.manifest import Manifest
    from pipeline.store.io import create_store
    from pipeline.store.units import done_units

    t0 = time.perf_counter()
    if "://" not in config.store:
        # Actors on other nodes (or with another working directory) must find the same store.
        config = config.replace(store=os.path.abspath(config.store))
    so = config.storage_options or None
    manifest = Manifest.open(config.manifest, storage_options=so)
    resolved = resolve(config)
    cfg = resolved.config
    attrs = store_attrs(resolved, manifest)
    layout = resolved.layout(manifest.num_rows, manifest.unit_size)
    create_store(cfg.store, layout, attrs=attrs, overwrite=cfg.overwrite, storage_options=so)
    lease.acquire()  # a new store (or one --overwrite replaced): take it now
    if lease.took_over:
        note(f"store {cfg.store}: took over the lease of {lease.took_over}")
    done = done_units(cfg.store, storage_options=so)
    todo = [u for u in range(manifest.num_units) if u not in done]
    if cfg.max_units is not None:
        todo = todo[: cfg.max_units]
    summary = RunSummary(
        store=cfg.store,
        manifest=str(manifest.uri),
        num_rows=manifest.num_rows,
        num_units=manifest.num_units,
        units_already_done=len(done),
    )
    if not todo:
        summary.units_remaining = manifest.num_units - len(done)
        summary.wall_s = time.perf_counter() - t0
        _finalize(cfg, summary)
        return summary

    # absolute manifest: actors may run elsewhere
    ctx = UnitContext(manifest=str(manifest.uri), store=cfg.store, layout=layout, layer=cfg.layer)
    sizes = {u: _unit_rows(manifest, u) for u in todo}
    del manifest  # the actors read rows themselves; the driver keeps only unit sizes

    import ray

    started_ray = False
    t_ray = time.perf_counter()
    if not ray.is_initialized():
        if cfg.progress:
            where = f"connecting to Ray at {cfg.address}" if cfg.address else "starting Ray"
            note(f"{where}; then {_actors_wanted(cfg)} load the model and tune (seconds)")
        _init_ray(cfg)
        reinstall()  # ray.init put its own SIGTERM handlers (and a C++ stack dump) in place
        started_ray = True
    summary.ray_s = time.perf_counter() - t_ray
    sched = None
    try:
        sched = Scheduler(cfg, ctx, todo, sizes, summary)
        try:
            sched.run()
        except KeyboardInterrupt as ki:
            e = why_stopped(ki)  # SIGTERM / SIGHUP, or Ctrl-C
            redo = sched.rows_in_flight()
            sched.stop(interrupted=True)
            summary.interrupted = True
            # The markers, not the driver's count: a unit whose marker was written just
            # before the signal may not have reached the driver yet.
            n_done = len(done_units(cfg.store, storage_options=so))
            summary.units_remaining = summary.num_units - n_done
            summary.wall_s = time.perf_counter() - t0
            _set_run_state(cfg, "interrupted", e.name if isinstance(e, Stopped) else "Ctrl-C")
            note(stopped_line(e, n_done, summary.num_units, cfg.store, redo))
            if isinstance(e, Stopped):
                e.reported = True
                raise e from None
            raise
        except BaseException as e:
            sched.stop(interrupted=True)
            _set_run_state(cfg, "failed", ray_error_line(e))
            raise
        sched.stop(interrupted=False)
    finally:
        if started_ray:
            ray.shutdown()
    summary.units_remaining = manifest_units_left(summary)
    _split_wall_time(summary, sched, t0)
    _finalize(cfg, summary)
    summary.wall_s = time.perf_counter() - t0
    summary.finish_s = summary.wall_s - summary.startup_s - summary.explain_s
    return summary


def _actors_wanted(cfg: RunConfig) -> str:
    n = cfg.actors
    return "the actors" if not n else ("1 actor" if n == 1 else f"{n} actors")


def _split_wall_time(summary: RunSummary, sched: Any, t0: float) -> None:
    """Start-up (to the first ready actor), explaining (to the last unit), finishing."""
    now = time.perf_counter()
    summary.wall_s = now - t0
    first = sched.t_first_ready if sched is not None else None
    last = sched.t_last_done if sched is not None else None
    if first is None:
        summary.startup_s = summary.wall_s
        return
    summary.startup_s = first - t0
    summary.explain_s = max(0.0, (last if last is not None else now) - first)
    summary.finish_s = max(0.0, summary.wall_s - summary.startup_s - summary.explain_s)



def _set_run_state(cfg: RunConfig, state: str, detail: str = "") -> None:
    """Driver-only metadata write (never fails the run: the markers are the truth)."""
    from pipeline.store.io import open_store

    try:
        g = open_store(cfg.store, mode="r+", storage_options=cfg.storage_options or None)
        g.update_attributes({"run_state": run_state(state, detail)})
    except Exception as e:  # pragma: no cover - best effort
        log.debug("could not record run state %s: %s", state, e)


def manifest_units_left(s: RunSummary) -> int:
    return s.num_units - s.units_already_done - s.units_processed


def _unit_rows(manifest: Any, u: int) -> int:
    start, stop = manifest.unit_range(u)
    return int(stop - start)


def _finalize(cfg: RunConfig, summary: RunSummary) -> None:
    if summary.complete:
        _set_run_state(cfg, "finished")
    else:
        why = f"{len(summary.failed_units)} failed units" if summary.failed_units else "max_units"
        _set_run_state(cfg, "incomplete", why)

    try:
        _finalize_store(cfg, summary)
    except OSError as e:
        # A full disk (or a lost mount) while finalising must not hide the failed units,
        # which are the report; markers stay the truth and a rerun finalises the store.
        if summary.complete:
            raise
        note(f"could not finalise {cfg.store} ({error_line(e)}); rerun the same command")


def _finalize_store(cfg: RunConfig, summary: RunSummary) -> None:
    from pipeline.store.io import finalize_store
    from pipeline.store.lease import drop_from_consolidated

    finalize_store(
        cfg.store,
        storage_options=cfg.storage_options or None,
        summary={
            "last_run": {
                "units_processed": summary.units_processed,
                "units_failed": sorted(summary.failed_units),
                "images_processed": summary.images_processed,
                "images_failed": summary.images_failed,
                "wall_seconds": round(summary.wall_s, 3),
                "startup_seconds": round(summary.startup_s, 3),
                "explain_seconds": round(summary.explain_s, 3),
                "images_per_second": round(summary.images_per_s, 3),
                "actors": len(summary.actors),
            }
        },
    )
    drop_from_consolidated(cfg.store, storage_options=cfg.storage_options or None)


def _init_ray(cfg: RunConfig) -> None:
    import ray

    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if cfg.address:
        kwargs["address"] = cfg.address
    else:
        if not cfg.dashboard:
            kwargs["include_dashboard"] = False
        # A private local instance: token auth protects multi-user clusters, but a
        # single-user local instance started just for this run does not need it.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # "local": always a new private instance; a bare ray.init() would join a cluster
        # someone else left running on this machine (``ray start --head``).
        kwargs["address"] = "local"
    ray.init(**kwargs)


