"""The store's words: metric array names, status names, row-text decoding, one limit.

Why here, with the layout: the driver names the ``metrics/<name>`` arrays it creates, the
worker fills them, and the reader, the report and the atlas parse them back; the status
codes are written by the worker and named by every reader. Living in ``store/`` (below
both ``run/`` and ``analysis/``) lets both sides use one rule without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.data.decode import Status

__all__ = [
    "INS_DEL_METRICS",
    "MAX_FAILED_ROWS",
    "MEMBER_SEP",
    "ROAD_METRICS",
    "member_metric",
    "metric_names",
    "parse_metric_name",
    "status_name",
    "store_metric_names",
    "text",
]

#: Failed rows a summary names (a unit's, a run's, ``status``'s): the first ten, by row id.
MAX_FAILED_ROWS = 10

#: Per-image metrics of the insertion/deletion family, in the order they are stored.
INS_DEL_METRICS = ("insertion", "deletion", "ins_minus_del")
#: ROAD (noisy linear imputation, :func:`unioncam.road.road`): MoRF (lower is better),
#: LeRF (higher is better) and ``road`` = (LeRF − MoRF) / 2 (higher is better).
ROAD_METRICS = ("road_morf", "road_lerf", "road")

#: ``insertion@region:scorecam`` = the insertion AUC of that pool member's map. ``@`` is not
#: used in pool member names (``region:x``, ``fused:g+r``, ``gradient:g``).
MEMBER_SEP = "@"

_STATUS_NAMES = {int(s): s.name for s in Status}


def status_name(code: Any) -> str:
    """The name of a stored status code (``0`` -> ``"OK"``); an unknown code as its number."""
    v = int(code)
    return _STATUS_NAMES.get(v, str(v))


def text(v: Any) -> str:
    """A stored string cell as ``str`` (zarr returns ``str``, numpy bytes or ``None``)."""
    if getattr(v, "ndim", None) == 0:  # a 0-d numpy array (one cell read from zarr)
        v = v.item()
    if v is None:
        return ""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def member_metric(metric: str, member: str) -> str:
    """Store name of a pool member's metric: ``insertion@fused:denoised+scorecam``."""
    return f"{metric}{MEMBER_SEP}{member}"


def parse_metric_name(name: str) -> tuple[str, str | None]:
    """``insertion@region:scorecam`` -> ``("insertion", "region:scorecam")``; a selected-map
    metric ``insertion`` -> ``("insertion", None)``."""
    metric, sep, member = name.partition(MEMBER_SEP)
    return metric, (member if sep else None)


def metric_names(pool: Sequence[str], *, all_members: bool = False) -> tuple[str, ...]:
    """Every key ``evaluate_batch`` returns for this pool (= the store's metric names)."""
    names = list(INS_DEL_METRICS)
    if all_members:
        names += [member_metric(m, p) for p in pool for m in INS_DEL_METRICS]
    return tuple(names)


def store_metric_names(
    requested: Sequence[str],
    pool: Sequence[str],
    all_members: bool = False,
    others: Sequence[str] = (),
) -> tuple[str, ...]:
    """The ``metrics/<name>`` arrays a run must create: the requested metrics (of the
    primary method's maps: UnionCAM's selected map), ``<metric>@<method>`` for each of the
    ``others`` methods of the run, plus — with ``all_members`` — every requested
    insertion/deletion-family metric per pool member.

    ``requested`` are :data:`pipeline.config.METRICS` names (``average_drop`` and
    ``increase`` stay selected-map only for pool members: they are one forward each and
    rarely compared).
    """
    names = list(requested)
    names += [member_metric(m, method) for method in others for m in requested]
    if all_members:
        names += [member_metric(m, p) for p in pool for m in requested if m in INS_DEL_METRICS]
    return tuple(names)
