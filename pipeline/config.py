"""Run configuration of the pipeline: one frozen description of a job.

Why a single dataclass: the same object travels from the CLI (or a ``ray submit`` script)
to the driver and, pickled, to every actor, and a JSON view of it is written into the
Zarr store as provenance. Its :meth:`RunConfig.fingerprint` covers exactly the settings
that change the *numbers* in the store (model, weights, layer, methods, preset, image size,
target, explainer, stored extras), so a rerun with a different batch size or number of
actors resumes the store, while a rerun with a different layer is refused instead of
silently mixing two kinds of maps in one store.

Secrets never leave this object: ``storage_options`` (which may hold S3 keys) is passed to
fsspec in the driver and the actors, but :meth:`RunConfig.to_dict` records only its key
names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.flags import flag
from pipeline.store.layout import STORE_FORMAT

if TYPE_CHECKING:  # torch comes with it: imported when a config is made, so `unioncam
    # --help`, `status` and `query` start without it
    from unioncam.union import UnionCAMConfig

__all__ = [
    "EXPLAINERS",
    "METRICS",
    "TARGETS",
    "FaultInjection",
    "UNIONCAM_GROUP",
    "RunConfig",
    "quiet_load_model",
]


#: ``unioncam``: the real method. ``null``: a stand-in that reads each unit's manifest rows
#: but neither decodes images nor runs a model, and writes zero maps/scores with status OK.
#: It exists to measure the pipeline's own per-unit overhead (scheduling, markers, shard
#: writes) at dataset scale; never use it for results.
EXPLAINERS = ("unioncam", "null")

#: Which class each image is explained for: the model's top-1 prediction, or the
#: manifest's label (rows without a label fall back to the prediction).
TARGETS = ("predicted", "label")

#: Optional per-image faithfulness metrics of the selected map, stored as
#: ``metrics/<name>`` (computed with :mod:`unioncam.metrics`; each costs extra forwards).
#: ``road_morf``, ``road_lerf``, ``road``: ROAD at 10–90 % removal (18 forwards per map).
METRICS = ("average_drop", "increase", "insertion", "deletion", "ins_minus_del", "road_morf",
           "road_lerf", "road")

#: The ``--help`` section of ``--preset`` (the CLI adds the flags overriding its fields there).
UNIONCAM_GROUP = "UnionCAM settings (a preset, then overrides of its fields)"


@dataclass(frozen=True)
class FaultInjection:
    """Test-only hooks that make a worker fail on purpose (fault-tolerance tests).

    ``crash_unit``: the actor process calls ``os._exit(1)`` in the middle of that unit
    (after its first batch has been explained, before anything is written). With
    ``crash_once_file`` set, it crashes only if that file does not exist yet and creates it
    just before exiting, so the retry succeeds: "crash on the first attempt only".
    ``fail_unit``: processing that unit raises ``RuntimeError`` on every attempt (a unit
    that keeps failing). ``unit_delay_s``: sleep this long at the start of every unit (to
    widen race windows, e.g. for interrupt tests).
    """

    crash_unit: int | None = None
    crash_once_file: str | None = None
    fail_unit: int | None = None
    unit_delay_s: float = 0.0


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one pipeline run.

    Settings that affect results (part of :meth:`fingerprint`): ``model``, ``weights``,
    ``layer``, ``methods``, ``preset``, ``image_size``, ``target``, ``explainer``,
    ``components``, ``metrics``. Everything else (batch size, actors, CPUs, retries,
    address, ...) only changes how fast the same numbers are produced.

    Every field but ``storage_options`` and ``fault_injection`` is a flag of ``unioncam
    run`` of the same name (:func:`pipeline.flags.flag`: its help and default live here).
    """

    manifest: str = flag(metavar="MANIFEST", help="Parquet manifest (unioncam manifest)")
    store: str = flag(metavar="STORE", help="Zarr store path or s3://bucket/prefix")
    # --- what is computed ---------------------------------------------------------
    model: str = flag(
        "efficientnet-lite0", group="model",
        help="%(default)s (built-in, pretrained; the default), a torchvision name "
        "(resnet50, ...), timm:<name> (timm:vit_small_patch16_224; needs unioncam[timm]) "
        "or package.module:factory",
    )  # fmt: skip
    weights: str | None = flag(
        None, group="model",
        help="checkpoint file (.safetensors or a weights-only torch file), a torchvision "
        "weights name (IMAGENET1K_V2), or 'pretrained' for timm's own weights from the local "
        "Hugging Face cache (never downloaded); default: the model's built-in or random weights",
    )  # fmt: skip
    layer: str | None = flag(None, group="model", help="target layer (dotted name; 'name#k' "
                             "for the k-th call); default: the model's")  # fmt: skip
    #: One map per method per image, in the store's ``maps`` array and ``methods/<name>``.
    #: The driver puts them in the library's order, so ``gradcam,unioncam`` and
    #: ``unioncam,gradcam`` are the same run.
    methods: tuple[str, ...] = flag(
        ("unioncam",), group="method", aliases=("--method",), metavar="NAMES",
        help="the CAM method(s), comma separated (default %(default)s): unioncam (its "
        "settings: --preset and below), gradcam, gradcam++, xgradcam, layercam, denoised, "
        "scorecam, groupcam; several (e.g. gradcam,unioncam) store one map each for the "
        "same images",
    )  # fmt: skip
    #: UnionCAM's settings (used when ``unioncam`` is among ``methods``), typed from the CLI
    #: to every actor; a preset's name or a dict of the fields (JSON) is accepted and
    #: converted. ``unioncam run`` builds it from ``--preset`` and the flags that override
    #: its fields (``--theta``, ...).
    preset: UnionCAMConfig = flag(
        default_factory=lambda: _method_class()(), group=UNIONCAM_GROUP, type=str,
        metavar="NAME",
        help="method preset: faithful, paper (the paper's exact method), faithful-fast or "
        "fast (Group-CAM region side); default: the library's unioncam.DEFAULT_PRESET",
    )  # fmt: skip
    #: ``None``: the model's default crop size.
    image_size: int | None = flag(None, group="model", metavar="S",
                                  help="network input side (default: the model's crop size)")
    #: ``None``: ``image_size`` (lossless). Smaller stores the network-input map
    #: area-downsampled (a CAM comes from a 7-28 px layer upsampled, so 56 px keeps it to
    #: within ~1e-2, docs/store.md, at 1/16 of the bytes).
    map_size: int | None = flag(
        None, group="model", metavar="S",
        help="side of the stored maps (default: the input side, lossless); smaller stores "
        "each map area-downsampled: 56 is 1/16 of the bytes (docs/store.md)",
    )  # fmt: skip
    target: str = flag("predicted", group="model", choices=TARGETS,
                       help="explain the predicted class or the manifest's label "
                       "(default %(default)s)")
    explainer: str = flag(
        "unioncam", group="execution", choices=EXPLAINERS,
        help="'null' writes zeros without decoding or a model: a benchmarking tool only",
    )  # fmt: skip
    #: ``components/<name>``: ``len(pool)`` times the map storage.
    components: bool = flag(False, group="method", help="also store every pool member's map")
    metrics: tuple[str, ...] = flag(
        (), group="method", metavar="NAMES",
        help=f"per-image metrics to store, comma separated ({', '.join(METRICS)})",
    )  # fmt: skip
    #: ``metrics/<metric>@<member>``, see :func:`pipeline.store.names.store_metric_names`.
    metrics_all_members: bool = flag(
        False, group="method",
        help="also score every pool member's map (insertion/deletion metrics)",
    )  # fmt: skip
    #: 224 at 224 px = 224 steps.
    metric_step: int = flag(224, group="method",
                            help="RISE pixels per insertion/deletion step (default %(default)s)")
    # --- how it is computed -------------------------------------------------------
    batch_size: int = flag(32, group="execution",
                           help="images per UnionCAM call (default %(default)s)")
    actors: int | None = flag(
        None, group="execution",
        help="number of actors (default: one per GPU, or CPUs // cpus-per-actor)",
    )  # fmt: skip
    cpu_only: bool = flag(False, group="execution", aliases=("--cpu",),
                          help="CPU-only actors (no GPU requested)")
    #: ``None``: automatic.
    cpus_per_actor: int | None = flag(None, group="execution",
                                      help="CPUs per actor (torch threads + decoding)")
    decode_threads: int | None = flag(None, group="execution",
                                      help="decoding threads per actor (default: its CPUs)")
    prefetch_batches: int = flag(
        2, group="execution",
        help="batches decoded ahead of the one being explained (default %(default)s)",
    )  # fmt: skip
    address: str | None = flag(
        None, group="execution",
        help="address of an existing Ray cluster ('auto', 'ray://host:10001'); default: "
        "start a local one",
    )  # fmt: skip
    overwrite: bool = flag(False, group="execution",
                           help="replace a store made with other settings")
    #: Actor death or unit-level error.
    max_retries: int = flag(3, group="execution",
                            help="extra attempts per unit (default %(default)s)")
    #: The store stays resumable.
    max_units: int | None = flag(None, group="execution",
                                 help="stop after this many units (resume later)")
    #: fsspec options for manifest, images and store (e.g. ``endpoint_url``, ``key``).
    #: Values are never written to the store or logged; only key names are. Not a generated
    #: flag: the CLI's ``--storage-option KEY=VALUE`` (every command has it) fills it.
    storage_options: dict[str, Any] | None = None
    #: ``ray.util.metrics`` for the dashboard.
    ray_metrics: bool = flag(True, group="execution", help="export Ray metrics")
    #: No effect with ``address``.
    dashboard: bool = flag(True, group="execution",
                           help="start the Ray dashboard with a local Ray (slower start)")
    progress: bool = flag(True, group="execution", help="tqdm progress bar in the driver")
    #: Test-only failure hooks (see :class:`FaultInjection`); not a flag.
    fault_injection: FaultInjection | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` with one line naming the first bad setting."""

        def pos(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        if not self.manifest:
            raise ValueError("manifest must be a path or URL, got an empty string")
        if not self.store:
            raise ValueError("store must be a path or URL, got an empty string")
        if not self.model:
            raise ValueError("model must be a name, got an empty string")
        pos("batch_size", self.batch_size)
        pos("actors", self.actors, allow_none=True)
        pos("cpus_per_actor", self.cpus_per_actor, allow_none=True)
        pos("decode_threads", self.decode_threads, allow_none=True)
        pos("image_size", self.image_size, allow_none=True)
        pos("map_size", self.map_size, allow_none=True)
        if self.map_size and self.image_size and self.map_size > self.image_size:
            raise ValueError(f"map_size {self.map_size} must be at most image_size "
                             f"{self.image_size}")
        pos("max_units", self.max_units, allow_none=True)
        if not isinstance(self.prefetch_batches, int) or self.prefetch_batches < 0:
            raise ValueError(
                f"prefetch_batches must be an integer >= 0, got {self.prefetch_batches!r}"
            )
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if self.explainer not in EXPLAINERS:
            raise ValueError(f"explainer must be one of {EXPLAINERS}, got {self.explainer!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if isinstance(self.methods, str):
            object.__setattr__(self, "methods", tuple(m for m in self.methods.split(",") if m))
        if isinstance(self.methods, list):
            object.__setattr__(self, "methods", tuple(self.methods))
        if not self.methods or not all(isinstance(m, str) and m for m in self.methods):
            raise ValueError(f"methods must be one or more method names, got {self.methods!r}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat, got {', '.join(self.methods)}")
        method_class = _method_class()
        if isinstance(self.preset, str):  # a preset's name
            object.__setattr__(self, "preset", method_class.preset(self.preset))
        if isinstance(self.preset, dict):  # from JSON (a store's provenance, a script)
            object.__setattr__(self, "preset", method_class.from_dict(self.preset))
        if not isinstance(self.preset, method_class):
            raise ValueError("preset must be a UnionCAMConfig (or its dict or a preset's "
                             f"name), got {self.preset!r}")  # fmt: skip
        for m in self.metrics:
            if m not in METRICS:
                raise ValueError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics must not repeat, got {self.metrics!r}")
        pos("metric_step", self.metric_step)
        if self.metrics_all_members and not set(self.metrics) & {
            "insertion",
            "deletion",
            "ins_minus_del",
        }:
            raise ValueError(
                "metrics_all_members needs insertion, deletion or ins_minus_del in metrics"
            )
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise ValueError("storage_options must be a dict of fsspec options")

    # ------------------------------------------------------------------ views
    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def result_settings(self) -> dict[str, Any]:
        """The settings that determine the stored numbers (the fingerprint's input).

        The keys are the stores' contract, not the fields' names: ``method`` is the preset's
        settings (the field was called so before it became ``preset``), so a store written
        before the rename still resumes.
        """
        return {
            "format_version": STORE_FORMAT,  # the stored values' meaning
            "model": self.model,
            "weights": self.weights,
            "layer": self.layer,
            "methods": list(self.methods),
            "method": self._method_settings() if self.explainer == "unioncam" else {},
            "image_size": self.image_size,
            "target": self.target,
            "explainer": self.explainer,
            "components": bool(self.components),
            "metrics": list(self.metrics),
            # Only when not the default, so stores made before these options still resume.
            **({"metrics_all_members": True} if self.metrics_all_members else {}),
            **({"metric_step": self.metric_step} if self.metric_step != 224 else {}),
            **({"map_size": self.map_size}
               if self.map_size and self.map_size != self.image_size else {}),
        }

    def _method_settings(self) -> dict[str, Any]:
        """UnionCAM's result settings, or the few the other methods take from it."""
        if "unioncam" in self.methods:
            return self.preset.result_settings()
        kw: dict[str, Any] = {}
        for name in self.methods:
            kw |= self.method_kwargs(name)
        return {k: v for k, v in kw.items() if k not in ("chunk_size", "channels_last")}

    def method_kwargs(self, name: str) -> dict[str, Any]:
        """Keyword arguments of :func:`unioncam.make_cam` for a method other than UnionCAM.

        The run's UnionCAM settings that mean the same for a component method apply to it:
        ``theta`` (the denoised Grad-CAM), ``groups`` (Group-CAM), the precision and the
        engine's chunk size and memory format.
        """
        m = self.preset
        kw: dict[str, Any] = {"autocast": m.autocast, "chunk_size": m.chunk_size,
                              "channels_last": m.channels_last}  # fmt: skip
        if name == "denoised":
            kw["theta"] = m.theta
        if name == "groupcam":
            kw["groups"] = m.groups
        return kw

    def fingerprint(self) -> str:
        """Hex SHA-256 of :meth:`result_settings` (stable JSON encoding).

        Two runs may share a store only if their fingerprints match. The driver calls this
        on the *resolved* config (default layer and image size filled in from the model),
        so ``--layer`` spelled out or left to its default give the same fingerprint.
        """
        blob = json.dumps(self.result_settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe provenance. ``storage_options`` is reduced to its sorted key names."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "storage_options":
                v = sorted(v) if v else []
            elif f.name == "fault_injection":
                v = dataclasses.asdict(v) if v is not None else None
            elif f.name in ("metrics", "methods"):
                v = list(v)
            elif f.name == "preset":
                v = v.to_dict()
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict` (storage options are not recoverable: pass them again).

        Also reads the provenance of stores written before ``method`` was renamed ``preset``.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "preset" not in d and isinstance(d.get("method"), dict):
            kw["preset"] = d["method"]
        kw["storage_options"] = None
        if kw.get("fault_injection") is not None:
            kw["fault_injection"] = FaultInjection(**kw["fault_injection"])
        for name in ("metrics", "methods"):
            if name in kw:
                kw[name] = tuple(kw[name])
        return cls(**kw)


def _method_class() -> type[UnionCAMConfig]:
    """The library's method config, imported on first use (it imports torch)."""
    from unioncam.union import UnionCAMConfig

    return UnionCAMConfig


def quiet_load_model(model: str, weights: str | None) -> Any:
    """``unioncam.load_model`` without the model packages' chatter on stdout.

    (efficientnet_lite_pytorch prints "Loaded pretrained weights ..." on every load, which
    would otherwise appear once per actor in the middle of the progress bar.)
    """
    import contextlib
    import io

    from unioncam import load_model

    with contextlib.redirect_stdout(io.StringIO()):
        return load_model(model, weights=weights)
