"""A report's settings as one typed object: what ``unioncam report`` and :func:`build_report` take.

One frozen dataclass instead of a function with 29 keyword arguments, so a default lives in
one place (the CLI's flags read theirs from here), a bad value fails when the config is
built, not halfway through an hour of explanations, and the whole set can be passed down and
printed as the command that regenerates the report.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from pipeline.analysis.evaluate import DEFAULT_METHODS
from pipeline.analysis.report.stats import ReportError

__all__ = ["ReportConfig"]

_TARGETS = ("predicted", "label")
_BY = ("target", "label", "predicted")


@dataclass(frozen=True)
class ReportConfig:
    """Every setting of a report. Exactly one source: ``store`` or ``images``."""

    # --- the source -----------------------------------------------------------------------
    #: A pipeline store to summarise (its stored metrics and maps): no model runs.
    store: str | None = None
    #: An image folder to explain on the fly (``labels.csv`` order if present).
    images: str | os.PathLike[str] | None = None
    #: fsspec options for a remote ``store`` (credentials, endpoints).
    storage_options: dict[str, Any] | None = None

    # --- images mode: what is explained, how ---------------------------------------------
    #: The classifier to explain (a built-in name, a timm name, or a checkpoint's).
    model: str = "efficientnet-lite0"
    #: Its weights (``None``: the model's default pretrained ones).
    weights: str | None = None
    #: The target layer (``None``: the model's default), as in ``unioncam run``.
    layer: str | None = None
    #: At most this many images (``None``: all): a quick report of a large folder.
    n: int | None = None
    #: Take every k-th image, so a small report spans the whole folder, not its first classes.
    every: int = 1
    #: Side of the centre crop the model sees (and the maps have).
    image_size: int = 224
    #: RISE pixels per insertion/deletion step: the metrics' cost (224 = 224 steps at 224 px).
    step: int = 224
    #: Methods compared, in :mod:`unioncam.names`' vocabulary; the first UnionCAM among them is
    #: the reference every other method is compared with.
    methods: tuple[str, ...] = DEFAULT_METHODS
    #: Images per checkpointed batch: what an interruption loses at most.
    batch_size: int = 2
    #: Forwards per model call (``None``: auto-tuned); speed only.
    chunk_size: int | None = None
    #: Group-CAM's groups (a preset keeps its own).
    groups: int = 32
    #: The class explained: the model's prediction or the ``labels.csv`` label.
    target: str = "predicted"
    #: Where the model runs (``None``: CUDA when available, else the CPU); the sanity check too.
    device: str | None = None
    #: Start no new batch after this many seconds; the report covers what is done.
    time_budget_s: float | None = None
    #: Checkpoint folder (``None``: ``OUT_DIR/.cache``, removed after a complete report).
    cache_dir: str | os.PathLike[str] | None = None
    #: Keep the default cache after a complete report (to regenerate it without recomputing).
    keep_cache: bool = False

    # --- the report ------------------------------------------------------------------------
    #: Gallery rows (0: none).
    gallery: int = 6
    #: Bootstrap resamples for the confidence intervals.
    n_boot: int = 2000
    #: Seeds the image order, the gallery's choice and the bootstrap: a report is reproducible.
    seed: int = 0
    #: Store mode: which class a per-class row groups by.
    by: str = "target"
    #: Run the randomisation sanity check on this many images (0: off; it costs ~2-6
    #: explanations per method and image).
    sanity: int = 0
    #: The report's title (``None``: one saying which source).
    title: str | None = None
    #: The command that regenerates the report, printed in it (the CLI fills it in).
    command: str | None = None
    #: Progress lines on stderr.
    progress: bool = False

    def __post_init__(self) -> None:
        if (self.store is None) == (self.images is None):
            raise ReportError("give exactly one source: a store (--store) or an image folder "
                              "(--images)")
        for name in ("n", "every", "image_size", "step", "batch_size", "n_boot", "groups",
                     "chunk_size"):  # fmt: skip
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ReportError(f"{name} must be a positive integer, got {v!r}")
        for name in ("every", "image_size", "step", "batch_size", "n_boot", "groups"):
            if getattr(self, name) is None:
                raise ReportError(f"{name} must be a positive integer, got None")
        if isinstance(self.gallery, bool) or not isinstance(self.gallery, int) or self.gallery < 0:
            raise ReportError(f"gallery must be >= 0, got {self.gallery}")
        if isinstance(self.sanity, bool) or not isinstance(self.sanity, int) or self.sanity < 0:
            raise ReportError(f"sanity must be an integer >= 0, got {self.sanity!r}")
        if self.target not in _TARGETS:
            raise ReportError(f"target must be 'predicted' or 'label', got {self.target!r}")
        if self.by not in _BY:
            raise ReportError(f"by must be target, label or predicted, got {self.by!r}")
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        if self.images is not None:
            from pipeline.analysis.evaluate import check_methods

            try:
                methods = check_methods(methods)
            except ValueError as e:
                raise ReportError(str(e)) from None
        object.__setattr__(self, "methods", methods)

    def replace(self, **changes: Any) -> ReportConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default (what the CLI's flags show and leave out of the command)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}
