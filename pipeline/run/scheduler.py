"""Dynamic pull scheduling of units over Ray actors, with retries and actor replacement.

Each actor holds at most two units (one being explained, one being decoded/written); when
one finishes it gets the next pending unit, so a slow actor simply takes fewer units. An
actor that dies is replaced and the unit it was running is retried; the units queued
behind it are re-queued without spending an attempt.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import deque
from typing import Any

from pipeline.config import RunConfig
from pipeline.run.plan import UnitContext, plan_resources
from pipeline.run.summary import ActorStats, RunSummary
from pipeline.store.names import MAX_FAILED_ROWS

__all__ = ["Scheduler", "note", "ray_error_line"]

log = logging.getLogger("unioncam.pipeline")

#: Units an actor holds at once (explain one while the previous one is written).
UNITS_IN_FLIGHT_PER_ACTOR = 2
#: Seconds between driver wake-ups when nothing finishes (Ctrl-C latency, bar refresh).
POLL_S = 0.5
#: Warn once if no actor has started after this long (cluster short of resources?).
ACTOR_START_WARN_S = 120.0
#: Seconds between progress polls of an actor (rows explained inside its units in flight).
PROGRESS_S = 1.0



def note(msg: str) -> None:
    """A line on stderr that does not break the progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except Exception:
        print(msg, file=sys.stderr)


def ray_error_line(e: BaseException) -> str:
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

    __slots__ = ("index", "handle", "ready", "inflight", "stats", "pid", "solo", "polled")

    def __init__(self, index: int, handle: Any, stats: ActorStats) -> None:
        self.index = index
        self.handle = handle
        self.ready = False
        self.inflight: deque[tuple[Any, int]] = deque()
        self.stats = stats
        self.pid = 0
        self.solo = False  # running a suspect unit alone: nothing else is dispatched
        self.polled = 0.0  # when its progress was last asked for (0: an answer is awaited)


class Scheduler:
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

        from pipeline.run.worker import ExplainWorker

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
            note(self.plan.note)
        self.remote_cls = ray.remote(ExplainWorker)
        self.metrics = _DriverMetrics() if cfg.ray_metrics else None
        self.bar = None
        self.stats_all: list[ActorStats] = []
        self.total_images = sum(sizes.values())
        self.t_start = time.perf_counter()
        #: When the first actor was ready and when the last unit finished (the wall-time split).
        self.t_first_ready: float | None = None
        self.t_last_done: float | None = None
        #: Rows of each in-flight unit already counted on the bar (from progress polls);
        #: taken back when the unit is retried, topped up to its size when it finishes.
        self.shown: dict[int, int] = {}
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
        self._postfix()

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> None:
        import ray
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total_images,
            unit="img",
            desc="starting",
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
                    note(
                        f"no actor has started after {ACTOR_START_WARN_S:.0f} s: the cluster may "
                        f"lack the resources ({self.plan.cpus_per_actor} CPU, "
                        f"{self.plan.gpus_per_actor} GPU per actor); still waiting"
                    )
            for ref in ready:
                if ref in self.refs:
                    self._handle(ref)
            self._poll_progress()
            if self.metrics is not None:
                self.metrics.set_pending(len(self.queue) + len(self.suspects))

    def _poll_progress(self) -> None:
        """Ask each busy actor (one question at a time) how far its units are."""
        if self.bar is None or self.bar.disable:
            return
        now = time.perf_counter()
        for slot in self.slots.values():
            if slot.ready and slot.inflight and slot.polled and now - slot.polled >= PROGRESS_S:
                slot.polled = 0.0
                self.refs[slot.handle.progress.remote()] = (slot.index, "progress", -1)

    def _progress(self, slot: _Slot, value: dict[int, tuple[int, int]]) -> None:
        slot.polled = time.perf_counter()
        held = {u for _r, u in slot.inflight}
        for u, (attempt, rows) in value.items():
            # A late answer about an earlier attempt (or a unit since finished) is stale.
            if u not in held or attempt != self.tries.get(u, 0) - 1:
                continue
            delta = int(rows) - self.shown.get(u, 0)
            if delta > 0:
                self.shown[u] = int(rows)
                self.bar.update(delta)

    def _unshow(self, u: int) -> None:
        """Take back the rows of ``u`` the bar showed: the unit will be explained again."""
        n = self.shown.pop(u, 0)
        if n and self.bar is not None:
            self.bar.update(-n)

    def rows_in_flight(self) -> int:
        """Rows explained in units that have no marker yet (redone by a rerun)."""
        return sum(self.shown.values())

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
        if kind == "progress":
            try:
                self._progress(slot, ray.get(ref))
            except ray.exceptions.RayError:
                pass  # the actor's unit refs report its death
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
            self._unit_failed(u, ray_error_line(e), self.queue)
            return
        except ray.exceptions.RayError as e:
            if kind == "ready":
                self._actor_start_failed(slot, e)
            else:
                self._actor_died(slot, e)
            return
        if kind == "ready":
            slot.ready = True
            slot.polled = time.perf_counter()
            self.start_failures = 0
            slot.pid = int(value.get("pid", 0))
            slot.stats.host = str(value.get("host", ""))
            slot.stats.node = str(value.get("node", ""))
            slot.stats.device = str(value.get("device", ""))
            self._postfix()  # the bar counts ready actors while the first units run
            if not self.ever_ready:
                self._first_ready(slot, value)
            self.ever_ready = True
            return
        slot.inflight = deque((r, v) for r, v in slot.inflight if r != ref)
        slot.solo = False
        self._unit_done(slot, value)

    def _first_ready(self, slot: _Slot, info: dict[str, Any]) -> None:
        """Say where start-up went (process + imports, model, tuning) and switch the bar."""
        self.t_first_ready = time.perf_counter()
        waited = self.t_first_ready - self.t_start
        load, tune = float(info.get("load_s", 0.0)), float(info.get("tune_s", 0.0))
        self.summary.actor_startup_s = waited
        if self.bar is not None and not self.bar.disable:
            note(
                f"actor {slot.index} ready on {slot.stats.device} after {waited:.1f} s "
                f"(process and imports {max(0.0, waited - load - tune):.1f} s, model "
                f"{load:.1f} s, tuning {tune:.1f} s); explaining {self.total_images} images"
            )
            self.bar.set_description_str("unioncam", refresh=False)
            # The rate and ETA should count from the first batch, not from Ray's start-up.
            self.bar.reset(total=self.total_images)

    def _unit_done(self, slot: _Slot, s: dict[str, Any]) -> None:
        sm = self.summary
        self.t_last_done = time.perf_counter()
        for row in s.get("failed_rows", ()):
            if len(sm.failed_rows) < MAX_FAILED_ROWS:
                sm.failed_rows.append(tuple(row))
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
            self.bar.update(int(s["rows"]) - self.shown.pop(int(s["unit"]), 0))
            self._postfix()
        if self.metrics is not None:
            self.metrics.unit_done()

    def _unit_failed(self, u: int, reason: str, retry_queue: deque[int]) -> None:
        """Blame ``u`` for a failure; retry it (via ``retry_queue``) or give up on it."""
        self._unshow(u)
        n = self.failures.get(u, 0) + 1
        self.failures[u] = n
        if self.metrics is not None:
            self.metrics.retry()
        if n > self.cfg.max_retries:
            self.summary.failed_units[u] = f"{reason} (after {n} attempts)"
            note(f"unit {u} failed {n} times, giving up on it: {reason}")
            self._postfix()
            return
        note(f"unit {u}: attempt {n} failed ({reason}); retrying")
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
        reason = f"actor {slot.index} died: {ray_error_line(e)}"
        held = [u for _r, u in slot.inflight]
        slot.stats.died = True
        self._kill(slot)
        self.summary.actors_replaced += 1
        if len(held) == 1:
            self._unit_failed(held[0], reason, self.suspects)
        elif held:
            for u in held:
                self._unshow(u)
            note(f"{reason}; retrying units {held} one at a time")
            self.summary.retries += len(held)
            self.suspects.extend(held)
        self._start_actor()

    def _actor_start_failed(self, slot: _Slot, e: BaseException) -> None:
        reason = ray_error_line(e)
        held = [u for _r, u in slot.inflight]
        self._kill(slot)
        for u in reversed(held):
            self._unshow(u)
            self.queue.appendleft(u)
        self.start_failures += 1
        if self.start_failures > self.cfg.max_retries + self.plan.actors:
            raise RuntimeError(
                f"could not start a worker actor ({self.start_failures} tries): {reason}"
            )
        note(f"actor {slot.index} failed to start ({reason}); starting another")
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
        """Kill every actor (a half-written unit has no marker) and wait until they are
        dead: ``ray.kill`` only asks, and a writer thread finishing a unit must not write
        beside a rerun once the lease is free (two writers of a shard lose data)."""
        handles = [slot.handle for slot in self.slots.values()]
        for slot in list(self.slots.values()):
            self._kill(slot)
        _await_dead(handles)
        if self.bar is not None:
            self.bar.close()
        self.summary.actors = self.stats_all
        self.summary.lost_nodes = _lost_nodes(self.stats_all)


def _await_dead(handles: list[Any], timeout_s: float = 10.0) -> None:
    """Return once a call to each killed actor fails (it is dead), or after ``timeout_s``."""
    import ray

    deadline = time.monotonic() + timeout_s
    for h in handles:
        while time.monotonic() < deadline:
            try:  # an answer means the kill has not landed yet: ask again
                ray.get(h.__ray_ready__.remote(), timeout=max(0.05, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                return
            except Exception:  # RayActorError: dead
                break
            time.sleep(0.05)


def _lost_nodes(stats: list[ActorStats]) -> list[str]:
    """``id (host)`` of every node an actor of the run died on that Ray no longer lists as
    alive: a lost node, not just a lost actor (its raylet, object store and actors)."""
    died = {(s.node, s.host) for s in stats if s.died and s.node}
    if not died:
        return []
    try:
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    except Exception:  # the summary must never fail the run
        return []
    return sorted(f"{node[:12]} ({host})" for node, host in died if node not in alive)


class _DriverMetrics:
    """Driver-side Ray metrics (dashboard): pending units, completed units, retries."""

    def __init__(self) -> None:
        try:
            from ray.util.metrics import Counter, Gauge

            self.pending = Gauge("unioncam_units_pending", description="Units not yet written.")
            self.done = Counter("unioncam_units_completed",
                                description="Units completed by this run.")
            self.retries = Counter("unioncam_unit_retries",
                                   description="Unit attempts that failed.")
        except Exception:
            self.pending = None

    # metrics must never fail the run
    def set_pending(self, n: int) -> None:
        if self.pending is not None:
            with contextlib.suppress(Exception):
                self.pending.set(n)

    def unit_done(self) -> None:
        if self.pending is not None:
            with contextlib.suppress(Exception):
                self.done.inc(1)

    def retry(self) -> None:
        if self.pending is not None:
            with contextlib.suppress(Exception):
                self.retries.inc(1)
