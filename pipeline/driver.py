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
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig
from pipeline.worker import UnitContext, quiet_load_model

__all__ = ["ActorStats", "RunSummary", "resolve", "run", "plan_resources"]

log = logging.getLogger("unioncam.pipeline")

#: Units an actor holds at once (explain one while the previous one is written).
UNITS_IN_FLIGHT_PER_ACTOR = 2
#: Seconds between driver wake-ups when nothing finishes (Ctrl-C latency, bar refresh).
POLL_S = 0.5
#: Warn once if no actor has started after this long (cluster short of resources?).
ACTOR_START_WARN_S = 120.0


# ---------------------------------------------------------------------------------------
# results
@dataclass
class ActorStats:
    """What one actor did (aggregates only)."""

    actor: int
    host: str = ""
    device: str = ""
    cpus: int = 0
    units: int = 0
    images: int = 0
    failed_images: int = 0
    busy_s: float = 0.0
    #: Parts of ``busy_s``: waiting for decoded images, inside the explainer, writing.
    decode_wait_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    #: Wall time during which the actor held at least one unit (units overlap inside an
    #: actor: one is written while the next is explained, so ``busy_s`` counts twice).
    active_s: float = 0.0
    last_end: float = 0.0
    died: bool = False

    @property
    def images_per_s(self) -> float:
        """Images per second of wall time while the actor was working on units."""
        return self.images / self.active_s if self.active_s > 0 else 0.0

    def add_interval(self, start: float, end: float) -> None:
        """Grow ``active_s`` by the part of [start, end] not yet covered."""
        self.active_s += max(0.0, end - max(start, self.last_end))
        self.last_end = max(self.last_end, end)


@dataclass
class RunSummary:
    """Returned by :func:`run`; printed by the CLI."""

    store: str
    manifest: str
    num_rows: int
    num_units: int
    units_already_done: int = 0
    units_processed: int = 0
    units_remaining: int = 0
    failed_units: dict[int, str] = field(default_factory=dict)
    images_processed: int = 0
    images_ok: int = 0
    images_failed: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    actors_started: int = 0
    actors_replaced: int = 0
    wall_s: float = 0.0
    actors: list[ActorStats] = field(default_factory=list)
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        """Every unit of the manifest has a completion marker."""
        return (
            self.units_already_done + self.units_processed == self.num_units
            and not self.failed_units
        )

    @property
    def images_per_s(self) -> float:
        return self.images_processed / self.wall_s if self.wall_s > 0 else 0.0

    def format(self) -> str:
        """A short human-readable report (what the CLI prints)."""
        lines = [
            f"store: {self.store}",
            f"units: {self.units_processed} processed now, {self.units_already_done} were already "
            f"done, {self.units_remaining} remaining, {len(self.failed_units)} failed "
            f"(of {self.num_units})",
            f"images: {self.images_processed} processed ({self.images_ok} ok, "
            f"{self.images_failed} failed) in {self.wall_s:.1f} s = {self.images_per_s:.2f} images/s",
        ]
        bad = {k: v for k, v in sorted(self.status_counts.items()) if k != "OK" and v}
        if bad:
            lines.append(
                "failed images by status: " + ", ".join(f"{k}={v}" for k, v in bad.items())
            )
        if self.retries or self.actors_replaced:
            lines.append(f"retries: {self.retries}; actors replaced: {self.actors_replaced}")
        for a in self.actors:
            lines.append(
                f"  actor {a.actor} ({a.host}, {a.device}, {a.cpus} cpu): {a.units} units, "
                f"{a.images} images, {a.images_per_s:.2f} images/s" + (" [died]" if a.died else "")
            )
        for u, msg in sorted(self.failed_units.items()):
            lines.append(f"FAILED unit {u}: {msg}")
        if self.interrupted or self.units_remaining or self.failed_units:
            lines.append("the store is resumable: rerun the same command to finish it")
        elif self.complete:
            lines.append("the store is complete")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# resolution: what the store will hold
@dataclass(frozen=True)
class Resolved:
    """The config with defaults filled in from the model, and what the store needs."""

    config: RunConfig
    map_size: int
    pool: tuple[str, ...]
    components: tuple[str, ...]
    preprocess: dict[str, Any]
    weights: str | None
    selection: str | None = None  # the rule's name when it is not β (stored separately)


def resolve(config: RunConfig) -> Resolved:
    """Load the model once in the driver to fill in layer/image size and check settings.

    Why in the driver: a typo in ``--layer`` or ``--preset`` must fail in the first seconds
    with one line, not in N actors after the cluster spun up; and the resolved values go
    into the fingerprint so that ``--layer X`` and its default X resume the same store.
    """
    if config.explainer == "null":
        size = config.image_size or 224
        cfg = config.replace(image_size=size, layer=config.layer)
        return Resolved(cfg, size, ("null",), (), {"crop_size": size}, config.weights)

    import torch

    from unioncam import UnionCAMConfig, resolve_layer

    method = UnionCAMConfig.from_dict(dict(config.method))
    loaded = quiet_load_model(config.model, config.weights)
    pre = loaded.preprocess
    size = config.image_size or pre.crop_size
    if size != pre.crop_size:
        pre = pre.with_size(size)
    layer = config.layer or loaded.target_layer
    example = torch.zeros(1, 3, size, size)
    try:
        target = resolve_layer(loaded.model, layer, example=example)
    except ValueError as e:
        msg = str(e)
        raise ValueError(
            msg if msg.startswith(("layer", "target_layer")) else f"layer: {msg}"
        ) from None
    components: tuple[str, ...] = ()
    if config.components:
        names = [f"gradient:{g}" for g in method.gradient]
        names += [f"region:{r}" for r in method.region]
        names += [f"fused:{g}+{r}" for g in method.gradient for r in method.region]
        components = tuple(names)
    cfg = config.replace(layer=str(target), image_size=size, method=method.to_dict())
    preprocess = {
        "resize_size": pre.resize_size,
        "crop_size": pre.crop_size,
        "mean": list(pre.mean),
        "std": list(pre.std),
    }
    selection = None if method.selection == "beta" else method.selection
    return Resolved(cfg, size, tuple(method.pool), components, preprocess, loaded.weights,
                    selection)


def store_attrs(res: Resolved, manifest: Any) -> dict[str, Any]:
    """Provenance written into the store's root attributes (no secrets)."""
    import platform

    versions: dict[str, str] = {"python": platform.python_version()}
    for mod in ("unioncam", "torch", "torchvision", "ray", "zarr", "numpy", "pyarrow"):
        try:
            versions[mod] = str(__import__(mod).__version__)
        except Exception:
            pass
    cfg = res.config
    return {
        "config": cfg.to_dict(),
        "config_fingerprint": cfg.fingerprint(),
        "manifest_fingerprint": manifest.fingerprint,
        "manifest": str(manifest.uri),
        "model": cfg.model,
        "weights": res.weights,
        "layer": cfg.layer,
        "image_size": res.map_size,
        "preprocess": res.preprocess,
        "method": cfg.method,
        "pool": list(res.pool),
        "target": cfg.target,
        "explainer": cfg.explainer,
        "num_rows": manifest.num_rows,
        "unit_size": manifest.unit_size,
        "num_units": manifest.num_units,
        "versions": versions,
        "run_started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_state": _run_state("running"),
    }


# ---------------------------------------------------------------------------------------
# resources
@dataclass(frozen=True)
class Plan:
    actors: int
    cpus_per_actor: int
    gpus_per_actor: int
    note: str = ""


def plan_resources(config: RunConfig, cluster: dict[str, float]) -> Plan:
    """Decide actor count and per-actor resources from the cluster's totals.

    GPU mode: one actor per GPU, each with ``CPUs // GPUs`` CPUs (capped at 8) for decoding.
    CPU-only (``cpu_only`` or no GPU in the cluster): actors of ``cpus_per_actor`` CPUs
    (default: all CPUs, at most 8 per actor), as many as fit.
    """
    total_cpu = int(cluster.get("CPU", 0))
    total_gpu = int(cluster.get("GPU", 0))
    note = ""
    if total_cpu < 1:
        raise ValueError("the Ray cluster has no CPUs to run actors on")
    gpu_mode = not config.cpu_only and total_gpu >= 1
    if not config.cpu_only and total_gpu < 1:
        note = "no GPU in the Ray cluster: running CPU-only actors (pass --cpu to silence this)"
    if gpu_mode:
        n = config.actors or total_gpu
        cpus = config.cpus_per_actor or max(1, min(8, total_cpu // max(1, min(n, total_gpu))))
        gpus = 1
    else:
        if config.cpus_per_actor:
            cpus = config.cpus_per_actor
        elif config.actors:
            cpus = max(1, total_cpu // config.actors)
        else:
            cpus = min(total_cpu, 8)
        n = config.actors or max(1, total_cpu // cpus)
        gpus = 0
    if cpus > total_cpu:
        raise ValueError(f"cpus_per_actor={cpus} exceeds the {total_cpu} CPUs of the Ray cluster")
    fit = total_cpu // cpus if not gpus else min(total_gpu, total_cpu // cpus)
    if n > fit:
        extra = f"{n} actors requested but only {fit} fit in the cluster now; the rest wait for resources"
        note = f"{note}; {extra}" if note else extra
    return Plan(n, cpus, gpus, note)


# ---------------------------------------------------------------------------------------
# the run
def run(config: RunConfig) -> RunSummary:
    """Run (or resume) the job described by ``config``; return its summary.

    Callable from Python (``ray submit`` scripts pass ``address="auto"``). Uses the Ray
    instance already initialised in this process if there is one; else connects to
    ``config.address`` or starts a local one (and shuts down only what it started).
    Raises ``ValueError`` (one line) for bad settings, manifests or mismatching stores,
    ``KeyboardInterrupt`` after a clean stop on Ctrl-C.
    """
    from pipeline.evaluate import store_metric_names
    from pipeline.manifest import Manifest
    from pipeline.store import create_store, done_units, read_layout

    t0 = time.perf_counter()
    if "://" not in config.store:
        # Actors on other nodes (or with another working directory) must find the same store.
        config = config.replace(store=os.path.abspath(config.store))
    so = config.storage_options or None
    manifest = Manifest.open(config.manifest, storage_options=so)
    resolved = resolve(config)
    cfg = resolved.config
    attrs = store_attrs(resolved, manifest)
    create_store(
        cfg.store,
        num_rows=manifest.num_rows,
        unit_size=manifest.unit_size,
        map_size=resolved.map_size,
        pool=resolved.pool,
        components=resolved.components,
        metrics=store_metric_names(cfg.metrics, resolved.pool, cfg.metrics_all_members),
        selection=resolved.selection,
        attrs=attrs,
        overwrite=cfg.overwrite,
        storage_options=so,
    )
    # What the store holds decides what actors write: a store resumed from before
    # ``selection_scores`` existed has none, whatever the rule.
    stored_selection = read_layout(cfg.store, storage_options=so).selection
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

    ctx = UnitContext(
        manifest=str(manifest.uri),  # absolute: actors may run elsewhere
        store=cfg.store,
        num_units=manifest.num_units,
        map_size=resolved.map_size,
        pool=resolved.pool,
        components=resolved.components,
        metrics=store_metric_names(cfg.metrics, resolved.pool, cfg.metrics_all_members),
        layer=cfg.layer,
        image_size=resolved.map_size,
        selection=stored_selection,
    )
    sizes = {u: _unit_rows(manifest, u) for u in todo}
    del manifest  # the actors read rows themselves; the driver keeps only unit sizes

    import ray

    started_ray = False
    if not ray.is_initialized():
        _init_ray(cfg)
        started_ray = True
    try:
        sched = _Scheduler(cfg, ctx, todo, sizes, summary)
        try:
            sched.run()
        except KeyboardInterrupt:
            sched.stop(interrupted=True)
            summary.interrupted = True
            summary.units_remaining = manifest_units_left(summary)
            summary.wall_s = time.perf_counter() - t0
            _set_run_state(cfg, "interrupted", "Ctrl-C")
            _note(
                f"interrupted: {summary.units_already_done + summary.units_processed} of "
                f"{summary.num_units} units are complete in {cfg.store}; rerun the same "
                "command to resume (finished units are skipped)"
            )
            raise
        except BaseException as e:
            sched.stop(interrupted=True)
            _set_run_state(cfg, "failed", _short_error(e))
            raise
        sched.stop(interrupted=False)
    finally:
        if started_ray:
            ray.shutdown()
    summary.units_remaining = manifest_units_left(summary)
    summary.wall_s = time.perf_counter() - t0
    _finalize(cfg, summary)
    return summary


def _run_state(state: str, detail: str = "") -> dict[str, Any]:
    """The driver's view of the run, kept in the store's root attributes.

    ``unioncam status`` uses it to tell "in progress" (state running and, on this host, the
    driver process alive) from "interrupted" or "finished".
    """
    import socket

    return {
        "state": state,
        "detail": detail,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _set_run_state(cfg: RunConfig, state: str, detail: str = "") -> None:
    """Driver-only metadata write (never fails the run: the markers are the truth)."""
    from pipeline.store import open_store

    try:
        g = open_store(cfg.store, mode="r+", storage_options=cfg.storage_options or None)
        g.update_attributes({"run_state": _run_state(state, detail)})
    except Exception as e:  # pragma: no cover - best effort
        log.debug("could not record run state %s: %s", state, e)


def manifest_units_left(s: RunSummary) -> int:
    return s.num_units - s.units_already_done - s.units_processed


def _unit_rows(manifest: Any, u: int) -> int:
    start, stop = manifest.unit_range(u)
    return int(stop - start)


def _finalize(cfg: RunConfig, summary: RunSummary) -> None:
    from pipeline.store import finalize_store

    if summary.complete:
        _set_run_state(cfg, "finished")
    else:
        why = f"{len(summary.failed_units)} failed units" if summary.failed_units else "max_units"
        _set_run_state(cfg, "incomplete", why)

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
                "images_per_second": round(summary.images_per_s, 3),
                "actors": len(summary.actors),
            }
        },
    )


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
    ray.init(**kwargs)


def _note(msg: str) -> None:
    """A line on stderr that does not break the progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except Exception:
        print(msg, file=sys.stderr)


def _short_error(e: BaseException) -> str:
    """One line out of a (possibly multi-line, traceback-laden) Ray error."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        text = str(cause)
        name = type(cause).__name__
    else:
        text = str(e)
        name = type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Ray puts the traceback first and the exception line last.
    pick = (
        lines[-1]
        if lines and lines[0].startswith(("Traceback", "ray::"))
        else (lines[0] if lines else "")
    )
    if len(pick) > 300:
        pick = pick[:297] + "..."
    return f"{name}: {pick}" if not pick.startswith(name) else pick


class _Slot:
    """One live actor and the units it holds (oldest first)."""

    __slots__ = ("index", "handle", "ready", "inflight", "stats", "pid", "solo")

    def __init__(self, index: int, handle: Any, stats: ActorStats) -> None:
        self.index = index
        self.handle = handle
        self.ready = False
        self.inflight: deque[tuple[Any, int]] = deque()
        self.stats = stats
        self.pid = 0
        self.solo = False  # running a suspect unit alone: nothing else is dispatched


class _Scheduler:
    """Dynamic pull scheduling with retries; all state for in-flight units lives here."""

    def __init__(
        self,
        cfg: RunConfig,
        ctx: UnitContext,
        todo: list[int],
        sizes: dict[int, int],
        summary: RunSummary,
    ) -> None:
        import ray

        from pipeline.worker import ExplainWorker

        self.cfg = cfg
        self.ctx = ctx
        self.queue: deque[int] = deque(todo)
        #: Units whose actor died while holding several units: which one killed it is
        #: unknown, so each is retried alone on an otherwise idle actor (exact blame next time).
        self.suspects: deque[int] = deque()
        self.sizes = sizes
        self.summary = summary
        self.tries: dict[int, int] = {}  # times dispatched (the worker's ``attempt``)
        self.failures: dict[int, int] = {}  # failures attributed to the unit
        self.slots: dict[int, _Slot] = {}
        self.refs: dict[Any, tuple[int, str, int]] = {}  # ref -> (slot, kind, unit)
        self.next_index = 0
        self.start_failures = 0
        self.ever_ready = False
        self.plan = plan_resources(cfg, ray.cluster_resources())
        if self.plan.note:
            _note(self.plan.note)
        self.remote_cls = ray.remote(ExplainWorker)
        self.metrics = _DriverMetrics() if cfg.ray_metrics else None
        self.bar = None
        self.stats_all: list[ActorStats] = []
        self.total_images = sum(sizes.values())
        self.t_start = time.perf_counter()
        self.waiting_noted = False

    # -- actors -----------------------------------------------------------------------
    def _start_actor(self) -> None:
        index = self.next_index
        self.next_index += 1
        opts: dict[str, Any] = {
            "num_cpus": self.plan.cpus_per_actor,
            "num_gpus": self.plan.gpus_per_actor,
            "max_restarts": 0,
            "max_task_retries": 0,
            "max_concurrency": UNITS_IN_FLIGHT_PER_ACTOR + 1,
        }
        handle = self.remote_cls.options(**opts).remote(
            self.cfg, self.ctx, self.plan.cpus_per_actor, index
        )
        stats = ActorStats(actor=index, cpus=self.plan.cpus_per_actor)
        self.stats_all.append(stats)
        slot = _Slot(index, handle, stats)
        self.slots[index] = slot
        self.refs[handle.ready.remote()] = (index, "ready", -1)
        self.summary.actors_started += 1

    def _kill(self, slot: _Slot) -> None:
        import ray

        for ref, _u in slot.inflight:
            self.refs.pop(ref, None)
        for ref in [r for r, (i, _k, _u) in self.refs.items() if i == slot.index]:
            self.refs.pop(ref, None)
        slot.inflight.clear()
        self.slots.pop(slot.index, None)
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> None:
        import ray
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total_images,
            unit="img",
            desc="unioncam",
            disable=not self.cfg.progress,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.05,
            # In a log file (ray job logs) redraw rarely instead of every 0.1 s.
            mininterval=0.2 if sys.stderr.isatty() else 30.0,
        )
        self._postfix()
        for _ in range(self.plan.actors):
            self._start_actor()
        while self.queue or self.suspects or any(s.inflight for s in self.slots.values()):
            self._dispatch()
            if not self.refs:
                # Every actor is gone and none is starting: start replacements.
                for _ in range(self.plan.actors):
                    self._start_actor()
                continue
            refs = list(self.refs)
            ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_S)
            if ready and len(refs) > 1:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            if not self.ever_ready and not self.waiting_noted:
                if time.perf_counter() - self.t_start > ACTOR_START_WARN_S:
                    self.waiting_noted = True
                    _note(
                        f"no actor has started after {ACTOR_START_WARN_S:.0f} s: the cluster may "
                        f"lack the resources ({self.plan.cpus_per_actor} CPU, "
                        f"{self.plan.gpus_per_actor} GPU per actor); still waiting"
                    )
            for ref in ready:
                if ref in self.refs:
                    self._handle(ref)
            if self.metrics is not None:
                self.metrics.set_pending(len(self.queue) + len(self.suspects))

    def _dispatch(self) -> None:
        for slot in list(self.slots.values()):
            if not slot.ready or slot.solo:
                continue
            if self.suspects and not slot.inflight:
                self._submit(slot, self.suspects.popleft())
                slot.solo = True
                continue
            while self.queue and len(slot.inflight) < UNITS_IN_FLIGHT_PER_ACTOR:
                self._submit(slot, self.queue.popleft())

    def _submit(self, slot: _Slot, u: int) -> None:
        attempt = self.tries.get(u, 0)
        self.tries[u] = attempt + 1
        ref = slot.handle.process.remote(u, attempt)
        slot.inflight.append((ref, u))
        self.refs[ref] = (slot.index, "process", u)

    def _handle(self, ref: Any) -> None:
        import ray

        index, kind, u = self.refs.pop(ref)
        slot = self.slots.get(index)
        if slot is None:
            return
        try:
            value = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if kind == "ready":
                self._actor_start_failed(slot, e)
                return
            # The unit raised inside a live actor: exact blame; retry (anywhere).
            slot.inflight = deque((r, v) for r, v in slot.inflight if r != ref)
            slot.solo = False
            self._unit_failed(u, _short_error(e), self.queue)
            return
        except ray.exceptions.RayError as e:
            if kind == "ready":
                self._actor_start_failed(slot, e)
            else:
                self._actor_died(slot, e)
            return
        if kind == "ready":
            slot.ready = True
            self.ever_ready = True
            self.start_failures = 0
            slot.pid = int(value.get("pid", 0))
            slot.stats.host = str(value.get("host", ""))
            slot.stats.device = str(value.get("device", ""))
            return
        slot.inflight = deque((r, v) for r, v in slot.inflight if r != ref)
        slot.solo = False
        self._unit_done(slot, value)

    def _unit_done(self, slot: _Slot, s: dict[str, Any]) -> None:
        sm = self.summary
        sm.units_processed += 1
        sm.images_processed += int(s["rows"])
        sm.images_ok += int(s["ok"])
        sm.images_failed += int(s["failed"])
        for k, v in s.get("status_counts", {}).items():
            sm.status_counts[k] = sm.status_counts.get(k, 0) + int(v)
        st = slot.stats
        st.units += 1
        st.images += int(s["rows"])
        st.failed_images += int(s["failed"])
        st.busy_s += float(s["seconds"])
        st.decode_wait_s += float(s.get("decode_wait_s", 0.0))
        st.compute_s += float(s.get("compute_s", 0.0))
        st.write_s += float(s.get("write_s", 0.0))
        if "wall_start" in s:
            st.add_interval(float(s["wall_start"]), float(s["wall_end"]))
        else:
            st.active_s += float(s["seconds"])
        self.tries.pop(int(s["unit"]), None)
        self.failures.pop(int(s["unit"]), None)
        if self.bar is not None:
            self.bar.update(int(s["rows"]))
            self._postfix()
        if self.metrics is not None:
            self.metrics.unit_done()

    def _unit_failed(self, u: int, reason: str, retry_queue: deque[int]) -> None:
        """Blame ``u`` for a failure; retry it (via ``retry_queue``) or give up on it."""
        n = self.failures.get(u, 0) + 1
        self.failures[u] = n
        if self.metrics is not None:
            self.metrics.retry()
        if n > self.cfg.max_retries:
            self.summary.failed_units[u] = f"{reason} (after {n} attempts)"
            _note(f"unit {u} failed {n} times, giving up on it: {reason}")
            self._postfix()
            return
        _note(f"unit {u}: attempt {n} failed ({reason}); retrying")
        self.summary.retries += 1
        retry_queue.append(u)

    def _actor_died(self, slot: _Slot, e: BaseException) -> None:
        """Replace a dead actor and retry what it held.

        Holding one unit, that unit is to blame (an attempt is spent). Holding several
        (one explained while the other was decoded or written), the culprit is unknown:
        nobody is charged and each is retried alone ("solo") on an idle actor, so that a
        unit which really kills actors is identified - and eventually given up on - without
        dragging innocent neighbours down with it.
        """
        reason = f"actor {slot.index} died: {_short_error(e)}"
        held = [u for _r, u in slot.inflight]
        slot.stats.died = True
        self._kill(slot)
        self.summary.actors_replaced += 1
        if len(held) == 1:
            self._unit_failed(held[0], reason, self.suspects)
        elif held:
            _note(f"{reason}; retrying units {held} one at a time")
            self.summary.retries += len(held)
            self.suspects.extend(held)
        self._start_actor()

    def _actor_start_failed(self, slot: _Slot, e: BaseException) -> None:
        reason = _short_error(e)
        held = [u for _r, u in slot.inflight]
        self._kill(slot)
        for u in reversed(held):
            self.queue.appendleft(u)
        self.start_failures += 1
        if self.start_failures > self.cfg.max_retries + self.plan.actors:
            raise RuntimeError(
                f"could not start a worker actor ({self.start_failures} tries): {reason}"
            )
        _note(f"actor {slot.index} failed to start ({reason}); starting another")
        self._start_actor()

    def _postfix(self) -> None:
        if self.bar is None or self.bar.disable:
            return
        self.bar.set_postfix(
            {
                "actors": sum(1 for s in self.slots.values() if s.ready),
                "bad_images": self.summary.images_failed,
                "failed_units": len(self.summary.failed_units),
            },
            refresh=False,
        )

    def stop(self, interrupted: bool) -> None:
        """Kill every actor (also on Ctrl-C: a half-written unit has no marker)."""
        for slot in list(self.slots.values()):
            self._kill(slot)
        if self.bar is not None:
            self.bar.close()
        self.summary.actors = self.stats_all


class _DriverMetrics:
    """Driver-side Ray metrics (dashboard): pending units, completed units, retries."""

    def __init__(self) -> None:
        try:
            from ray.util.metrics import Counter, Gauge

            self.pending = Gauge("unioncam_units_pending", description="Units not yet written.")
            self.done = Counter(
                "unioncam_units_completed", description="Units completed by this run."
            )
            self.retries = Counter(
                "unioncam_unit_retries", description="Unit attempts that failed."
            )
        except Exception:
            self.pending = None

    def set_pending(self, n: int) -> None:
        if self.pending is not None:
            try:
                self.pending.set(n)
            except Exception:
                pass

    def unit_done(self) -> None:
        if self.pending is not None:
            try:
                self.done.inc(1)
            except Exception:
                pass

    def retry(self) -> None:
        if self.pending is not None:
            try:
                self.retries.inc(1)
            except Exception:
                pass
