"""The Ray actor that explains units: one per GPU (or per ``cpus_per_actor`` CPUs).

Why it looks like this:

* The model is loaded once per actor (``__init__``), never per unit, and the
  :class:`unioncam.UnionCAM` context is entered once and reused for every batch.
* Decoding runs in a thread pool while the model runs: PIL's decoders and torch's kernels
  release the GIL, so batch ``b+1`` (and ``b+2``) are decoded while batch ``b`` is explained.
* The actor is *threaded* (``max_concurrency=2``) and the driver keeps two units in flight
  per actor: the explain phase of a unit holds ``_compute_lock``, the shard write does not,
  so unit ``k+1`` is decoded and explained while unit ``k`` is being written (which matters
  on object stores, where a shard write takes seconds). Two units never share a shard, so
  the two threads never write the same Zarr shard.
* Every unit is written whole, by exactly this actor, with the completion marker last
  (:func:`pipeline.store.units.write_unit`). A retried unit recomputes and rewrites the same
  shard: writes are idempotent, which Ray's at-least-once delivery requires.
* A bad image never fails a unit: it gets a status and a one-line message, a NaN map and
  NaN scores; the rest of its batch is explained. A batch the model rejects is split in
  halves until the offending image is isolated (also the answer to a GPU running out of
  memory on one large batch).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.config import RunConfig, quiet_load_model
from pipeline.data.decode import Status, load_row
from pipeline.data.location import redact_uri
from pipeline.data.manifest import Manifest
from pipeline.messages import error_line
from pipeline.run.metrics import batch_metrics
from pipeline.run.plan import UnitContext
from pipeline.run.rows import empty_unit_arrays, null_maps, rows_from_result, stored_maps
from pipeline.store.layout import primary_method
from pipeline.store.names import MAX_FAILED_ROWS
from pipeline.store.units import UnitWriter

__all__ = ["ExplainWorker", "PoolMismatchError"]


class PoolMismatchError(RuntimeError):
    """The method in this actor produces other pool members than the store holds."""


def _node_id() -> str:
    """The Ray node this actor runs on ("" outside Ray): what names a lost node."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""
    except Exception:
        return ""


class _Decoded:
    """One decoded row (or the reason it could not be decoded)."""

    __slots__ = ("tensor", "orig", "box", "status", "message")

    def __init__(self, tensor, orig, box, status, message) -> None:
        self.tensor = tensor
        self.orig = orig
        self.box = box
        self.status = status
        self.message = message


class ExplainWorker:
    """Explains whole units and writes them. Wrapped with ``ray.remote`` by the driver.

    Plain class on purpose: the driver decides the resources (``num_gpus``/``num_cpus``)
    with ``ray.remote(ExplainWorker).options(...)``, and tests/benchmarks can also use it
    in-process.
    """

    def __init__(self, config: RunConfig, ctx: UnitContext, cpus: int, actor_index: int = 0):
        self.config = config
        self.ctx = ctx
        self.cpus = max(1, int(cpus))
        self.actor_index = actor_index
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._compute_lock = threading.Lock()
        threads = config.decode_threads or self.cpus
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self._storage_options = config.storage_options or None
        self._units_done = 0
        #: unit -> (attempt, rows explained so far): what :meth:`progress` reports, so the
        #: driver's bar moves per batch rather than per unit (a unit is ~minutes on a CPU).
        self._progress: dict[int, tuple[int, int]] = {}
        self._metrics = _WorkerMetrics(actor_index) if config.ray_metrics else None

        # The driver validated the manifest; an actor only needs its footer.
        self.manifest = Manifest.open(
            ctx.manifest, storage_options=self._storage_options, validate=False
        )
        # One writer for the actor's life: the layout came with the context, so no unit
        # reads the store's metadata.
        self.writer = UnitWriter(ctx.store, ctx.layout, self._storage_options)
        if config.explainer == "null":  # no torch, no model: the pipeline's bare overhead
            self.device = "cpu"
            self.loaded = None
            self.cam = None
            self.cams = {}
            self.preprocess = None
            self.load_s = self.tune_s = 0.0
            return

        import torch

        from unioncam import UnionCAM, make_cam

        # Without this torch uses one thread inside a Ray actor (Ray sets
        # OMP_NUM_THREADS=1 unless num_cpus is given); make it match what we reserved.
        torch.set_num_threads(self.cpus)

        use_cuda = torch.cuda.is_available() and not config.cpu_only
        self.device = torch.device("cuda") if use_cuda else torch.device("cpu")
        t_load = time.perf_counter()
        self.loaded = quiet_load_model(config.model, config.weights)
        self.model = self.loaded.model.to(self.device)
        pre = self.loaded.preprocess
        if ctx.image_size != pre.crop_size:
            pre = pre.with_size(ctx.image_size)
        self.preprocess = pre
        method = config.preset
        # Components are a storage option of the run, not a result setting of the method.
        # ... and so are every member's maps when every member is scored.
        method = dataclasses.replace(
            method, return_components=bool(ctx.layout.components) or config.metrics_all_members
        )
        # One CAM per method, the primary (UnionCAM if present) first: it decides the class
        # explained, which the others then explain too.
        primary = primary_method(ctx.layout.methods)
        self.cams = {
            name: UnionCAM(self.model, ctx.layer, config=method) if name == "unioncam"
            else make_cam(name, self.model, ctx.layer, **config.method_kwargs(name))
            for name in sorted(ctx.layout.methods, key=lambda m: m != primary)
        }  # fmt: skip
        self.cam = self.cams[primary]
        # One method: entered once for the actor's life. Several: each is entered around
        # its own call, because an entered CAM keeps its hook on the layer and would hoard
        # the activations of every other method's forwards.
        if len(self.cams) == 1:
            self.cam.__enter__()
        # Auto-tune now (seconds, once per actor) rather than inside the first unit.
        s = ctx.image_size
        t_tune = time.perf_counter()
        self.load_s = t_tune - t_load
        for cam in self.cams.values():
            with cam:
                cam.prepare(torch.zeros(1, 3, s, s, device=self.device))
        self.tune_s = time.perf_counter() - t_tune

    # ------------------------------------------------------------------ info
    def ready(self) -> dict[str, Any]:
        """Called once by the driver: proves the model loaded; says where we run."""
        return {
            "actor": self.actor_index,
            "host": self.host,
            "pid": self.pid,
            "device": str(self.device),
            "cpus": self.cpus,
            # Where this actor's start-up went (the driver's summary splits the wall time).
            "load_s": self.load_s,
            "tune_s": self.tune_s,
            "node": _node_id(),
        }

    def progress(self) -> dict[int, tuple[int, int]]:
        """Rows explained so far of each unit in flight: ``{unit: (attempt, rows)}``.

        Polled by the driver (the actor is threaded, so this answers while a unit runs);
        a finished unit is reported by :meth:`process`'s return value instead.
        """
        return dict(self._progress)

    # ------------------------------------------------------------------ work
    def process(self, u: int, attempt: int = 0) -> dict[str, Any]:
        """Explain and write unit ``u``; return a small summary (no arrays)."""
        t0 = time.perf_counter()
        wall0 = time.time()
        fi = self.config.fault_injection
        if fi is not None:
            if fi.unit_delay_s:
                time.sleep(fi.unit_delay_s)
            if fi.fail_unit is not None and fi.fail_unit == u:
                raise RuntimeError(f"injected failure in unit {u} (attempt {attempt})")

        rows = self.manifest.read_unit(u)
        n = len(rows)
        arrays = empty_unit_arrays(n, self.ctx)
        arrays["label"][:] = [(-1 if r.label is None else int(r.label)) for r in rows]
        arrays["uri"][:] = [redact_uri(r.uri) if r.uri else "" for r in rows]
        t_read = time.perf_counter()

        if self.config.explainer == "null":
            self._null_fill(u, arrays)
            decode_s = compute_s = lock_s = 0.0
        else:
            decode_s, compute_s, lock_s = self._explain_rows(u, rows, arrays, attempt)
        t_explained = time.perf_counter()

        self.writer.write(
            u,
            arrays,
            info={
                "attempt": attempt,
                "actor": self.actor_index,
                "explain_seconds": round(t_explained - t0, 3),
            },
        )
        t_end = time.perf_counter()

        status = arrays["status"]
        counts = {
            Status(int(k)).name: int(v)
            for k, v in zip(*np.unique(status, return_counts=True), strict=True)
        }
        ok = int((status == int(Status.OK)).sum())
        self._units_done += 1
        self._progress.pop(u, None)
        bad = np.nonzero(status != int(Status.OK))[0][:MAX_FAILED_ROWS]
        summary = {
            "unit": u,
            "attempt": attempt,
            "rows": n,
            "ok": ok,
            "failed": n - ok,
            "status_counts": counts,
            # (row id, uri, status, message) of the first few failed rows: the run summary
            # names files, not just counts.
            "failed_rows": [
                (int(self.manifest.unit_range(u)[0] + i), str(arrays["uri"][i]),
                 Status(int(status[i])).name, str(arrays["error"][i]))
                for i in bad.tolist()
            ],
            "seconds": t_end - t0,
            "wall_start": wall0,
            "wall_end": wall0 + (t_end - t0),
            "lock_wait_s": lock_s,
            "read_s": t_read - t0,
            "decode_wait_s": decode_s,
            "compute_s": compute_s,
            "write_s": t_end - t_explained,
            "actor": self.actor_index,
            "host": self.host,
            "pid": self.pid,
        }
        if self._metrics is not None:
            self._metrics.record(summary)
        return summary

    def _null_fill(self, u: int, arrays: dict[str, np.ndarray]) -> None:
        """The ``null`` explainer: CAM-like maps (:func:`null_maps`), the label (0 without
        one) as the class explained and predicted, so that a rehearsal's analysis sees the
        dataset's classes, zeros elsewhere, status OK (benchmarking only)."""
        cls = np.maximum(arrays["label"], 0)
        for name, a in arrays.items():
            if name in ("label", "error", "uri"):
                continue
            if name in ("target", "predicted"):
                a[:] = cls
                continue
            if name == "status":
                a[:] = int(Status.OK)
            elif a.ndim == 3:  # maps, methods/*, components/*
                a[...] = null_maps(u, a.shape[0], a.shape[1:])
            else:
                a[...] = 0

    def _decode(self, row) -> _Decoded:
        try:
            t, orig, box, status, msg = load_row(row, self.preprocess, self._storage_options)
        except Exception as e:  # load_row should not raise; never let one row kill a unit
            return _Decoded(None, (0, 0), (0, 0, 0, 0), Status.READ_ERROR, error_line(e))
        return _Decoded(t, orig, box, status, msg)

    def _explain_rows(
        self, u: int, rows: Sequence, arrays: dict[str, np.ndarray], attempt: int = 0
    ) -> tuple[float, float, float]:
        """Decode (threads, prefetched) and explain all rows of a unit into ``arrays``."""
        bs = self.config.batch_size
        starts = list(range(0, len(rows), bs))
        ahead = max(0, self.config.prefetch_batches) + 1
        pending: deque[tuple[int, list[Future]]] = deque()
        next_b = 0

        def submit_next() -> None:
            nonlocal next_b
            if next_b < len(starts):
                s = starts[next_b]
                pending.append((s, [self._pool.submit(self._decode, r) for r in rows[s : s + bs]]))
                next_b += 1

        # Start decoding before taking the lock: while another unit of this actor is still
        # being explained, our first batches are already being decoded.
        for _ in range(ahead):
            submit_next()

        decode_wait = 0.0
        compute = 0.0
        fi = self.config.fault_injection
        t_lock = time.perf_counter()
        with self._compute_lock:
            lock_wait = time.perf_counter() - t_lock
            batch_no = 0
            while pending:
                s, futures = pending.popleft()
                submit_next()
                tw = time.perf_counter()
                decoded = [f.result() for f in futures]
                tc = time.perf_counter()
                decode_wait += tc - tw
                for i, d in enumerate(decoded):
                    r = s + i
                    arrays["orig_size"][r] = d.orig
                    arrays["crop_box"][r] = d.box
                    arrays["status"][r] = int(d.status)
                    arrays["error"][r] = d.message or ""
                ok = [
                    i
                    for i, d in enumerate(decoded)
                    if d.tensor is not None and d.status == Status.OK
                ]
                if ok:
                    self._explain_batch(
                        [s + i for i in ok], [decoded[i].tensor for i in ok], arrays
                    )
                compute += time.perf_counter() - tc
                batch_no += 1
                self._progress[u] = (attempt, s + len(decoded))
                if (
                    fi is not None
                    and fi.crash_unit == u
                    and batch_no == 1
                    and (fi.crash_once_file is None or not os.path.exists(fi.crash_once_file))
                ):
                    if fi.crash_once_file is not None:
                        with open(fi.crash_once_file, "w") as fh:
                            fh.write(f"crashed in unit {u}\n")
                    os._exit(1)
        return decode_wait, compute, lock_wait

    def _explain_batch(self, idx: list[int], tensors: list, arrays: dict[str, np.ndarray]) -> None:
        """Explain one batch; on a model error split it to isolate the bad image(s)."""
        import torch

        try:
            x = torch.stack(tensors)
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            targets = None
            if self.config.target == "label":
                labels = arrays["label"][idx]
                targets = [int(v) if v >= 0 else None for v in labels]
            results = {}
            for name, cam in self.cams.items():
                with cam:
                    results[name] = cam(x, targets=targets)
                # Every other method explains the class the primary one explained.
                targets = results[name].target
            res = results[self.cam_name]
            if "unioncam" in results and tuple(res.pool) != tuple(self.ctx.layout.pool):
                raise PoolMismatchError(
                    f"the method's pool {tuple(res.pool)} differs from the store's {self.ctx.layout.pool}"
                )
            size = self.ctx.layout.map_size
            out = rows_from_result(res, size)
            for name, other in results.items():
                if name != self.cam_name:
                    out[f"methods/{name}"] = stored_maps(other.maps, size)
            with self.cam:
                if self.config.target == "label":
                    out["predicted"] = self.cam.softmax(x).argmax(1).cpu().numpy()
                else:
                    out["predicted"] = out["target"]
                for name in self.ctx.layout.components:
                    out[f"components/{name}"] = stored_maps(res.components[name], size)
                for name, values in self._metrics_for(x, results).items():
                    out[f"metrics/{name}"] = values
        except Exception as e:
            if isinstance(e, PoolMismatchError):
                raise
            if len(idx) > 1:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                half = len(idx) // 2
                self._explain_batch(idx[:half], tensors[:half], arrays)
                self._explain_batch(idx[half:], tensors[half:], arrays)
                return
            arrays["status"][idx[0]] = int(Status.MODEL_ERROR)
            arrays["error"][idx[0]] = f"model error: {error_line(e)}"
            return
        for name, values in out.items():
            arrays[name][idx] = values

    @property
    def cam_name(self) -> str:
        """The primary method (the first of :attr:`cams`)."""
        return next(iter(self.cams))

    def _metrics_for(self, x, results: dict[str, Any]) -> dict[str, np.ndarray]:
        """The run's stored metrics of each method's maps (:mod:`pipeline.run.metrics`)."""
        return batch_metrics(self.cam, self.cam_name, x, results, self.ctx.layout.metrics,
                             step=self.config.metric_step,
                             all_members=self.config.metrics_all_members)  # fmt: skip

    def shutdown(self) -> None:
        """Release the hook and threads (the driver kills actors anyway)."""
        if self.cam is not None:
            self.cam.close()
            self.cam = None
        self._pool.shutdown(wait=False, cancel_futures=True)


class _WorkerMetrics:
    """Ray metrics exported by each actor (visible in the Ray dashboard / Prometheus)."""

    def __init__(self, actor_index: int) -> None:
        try:
            from ray.util.metrics import Counter, Gauge, Histogram

            self.images = Counter(
                "unioncam_images",
                description="Images processed, by outcome.",
                tag_keys=("outcome",),
            )
            self.units = Counter("unioncam_units", description="Units written by the actors.")
            self.rate = Gauge(
                "unioncam_actor_images_per_second",
                description="Throughput of the actor's last unit.",
                tag_keys=("actor",),
            )
            self.unit_seconds = Histogram(
                "unioncam_unit_seconds",
                description="Wall time per unit in an actor.",
                boundaries=[0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600],
            )
            self.actor = str(actor_index)
        except Exception:  # metrics must never break a run
            self.images = None

    def record(self, s: dict[str, Any]) -> None:
        if self.images is None:
            return
        try:
            self.images.inc(s["ok"], tags={"outcome": "ok"})
            if s["failed"]:
                self.images.inc(s["failed"], tags={"outcome": "failed"})
            self.units.inc(1)
            if s["seconds"] > 0:
                self.rate.set(s["rows"] / s["seconds"], tags={"actor": self.actor})
            self.unit_seconds.observe(s["seconds"])
        except Exception:
            pass
