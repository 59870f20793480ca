"""Planning a run before any actor starts: resolve the model's defaults, the store's
attributes, the actors' resources, and the :class:`UnitContext` every actor agrees on.

Why in the driver: a typo in ``--layer`` or ``--preset`` must fail in the first seconds
with one line, not in N actors after the cluster spun up.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig, quiet_load_model
from pipeline.store.layout import StoreLayout
from pipeline.store.names import store_metric_names

__all__ = [
    "Plan",
    "Resolved",
    "UnitContext",
    "plan_resources",
    "resolve",
    "run_state",
    "store_attrs",
]


@dataclass(frozen=True)
class UnitContext:
    """What the driver resolved once and every actor must agree on: where the rows and the
    store are, the store's :class:`StoreLayout` (the contract it was created from, so an
    actor writes units without reading metadata back) and the layer explained."""

    manifest: str
    store: str
    layout: StoreLayout
    layer: str | None

    @property
    def image_size(self) -> int:
        """The square network input's side."""
        return int(self.layout.image_size[0])


@dataclass(frozen=True)
class Resolved:
    """The config with defaults filled in from the model, and what the store needs."""

    config: RunConfig
    image_size: int
    pool: tuple[str, ...]
    components: tuple[str, ...]
    preprocess: dict[str, Any]
    weights: str | None
    selection: str = "beta"  # the selection rule: what ``selection_score`` holds
    methods: tuple[str, ...] = ("unioncam",)
    weights_sha256: str | None = None  # the checkpoint file's hash, when one was loaded

    def layout(self, num_rows: int, unit_size: int) -> StoreLayout:
        """THE store layout of this run over a manifest of ``num_rows`` rows in units of
        ``unit_size``: built once here, then passed to ``create_store`` and every actor."""
        from pipeline.store.layout import primary_method

        cfg = self.config
        primary = primary_method(self.methods)
        metrics = store_metric_names(cfg.metrics, self.pool, cfg.metrics_all_members,
                                     others=[m for m in self.methods if m != primary])
        side = cfg.map_size or self.image_size
        return StoreLayout(
            num_rows=int(num_rows), unit_size=int(unit_size),
            image_size=(self.image_size, self.image_size), map_size=(side, side),
            pool=self.pool, components=self.components, metrics=metrics,
            selection=self.selection or ("beta" if "unioncam" in self.methods else ""),
            methods=self.methods,
        )  # fmt: skip


def resolve(config: RunConfig) -> Resolved:
    """Load the model once in the driver to fill in layer/image size and check settings.

    Why in the driver: a typo in ``--layer`` or ``--preset`` must fail in the first seconds
    with one line, not in N actors after the cluster spun up; and the resolved values go
    into the fingerprint so that ``--layer X`` and its default X resume the same store.
    """
    if config.explainer == "null":
        size = config.image_size or 224
        cfg = config.replace(image_size=size, layer=config.layer)
        return Resolved(cfg, size, ("null",), (), {"crop_size": size}, config.weights,
                        methods=("unioncam",))

    import torch

    from unioncam import METHODS, resolve_layer

    for name in config.methods:
        METHODS.check(name)  # one line listing the choices
    # The library's order: the same set of methods is the same run (and fingerprint).
    methods = tuple(m for m in METHODS.names() if m in config.methods)
    union = "unioncam" in methods
    method = config.preset
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
    if config.components and not union:
        raise ValueError("components are UnionCAM's pool members: --components needs "
                         "unioncam among the methods")
    if config.metrics_all_members and not union:
        raise ValueError("metrics of every pool member need unioncam among the methods")
    if config.components:
        names = [f"gradient:{g}" for g in method.gradient]
        names += [f"region:{r}" for r in method.region]
        names += [f"fused:{g}+{r}" for g in method.gradient for r in method.region]
        components = tuple(names)
    cfg = config.replace(layer=str(target), image_size=size, preset=method.to_dict(),
                         methods=methods)
    preprocess = {
        "resize_size": pre.resize_size,
        "crop_size": pre.crop_size,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
    }
    return Resolved(cfg, size, tuple(method.pool) if union else (), components, preprocess,
                    loaded.weights, method.selection if union else "", methods,
                    loaded.weights_sha256)


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
        # The file's identity: a path says where the weights were, not which they were.
        "weights_sha256": res.weights_sha256,
        "layer": cfg.layer,
        "image_size": res.image_size,
        "preprocess": res.preprocess,
        "methods": list(res.methods),
        "method": cfg.preset.to_dict(),  # the stores' word for the preset's settings
        # UnionCAM's preset: "faithful", or "custom (fast with groups=4)"; "" without UnionCAM
        "preset": cfg.preset.describe() if "unioncam" in res.methods else "",
        "pool": list(res.pool),
        "target": cfg.target,
        "explainer": cfg.explainer,
        "num_rows": manifest.num_rows,
        "unit_size": manifest.unit_size,
        "num_units": manifest.num_units,
        "versions": versions,
        "run_started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_state": run_state("running"),
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




def run_state(state: str, detail: str = "") -> dict[str, Any]:
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

