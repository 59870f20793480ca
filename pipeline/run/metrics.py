"""The worker's per-batch faithfulness metrics, named like the store's ``metrics/<name>``.

Why a module of its own: it is what an actor runs right after explaining a batch (extra
forwards through the primary CAM's engine), so it belongs to the run, and it keeps
:mod:`pipeline.run.worker` about scheduling rows rather than scoring them. The metrics
themselves are :mod:`unioncam.metrics` and :mod:`unioncam.road`; their stored names are
:mod:`pipeline.store.names`.

Cost: insertion/deletion at RISE's default step (224 pixels per step at 224 px) costs
``2 * 223`` forwards per map per image, more than the explanation itself, so every map is
scored exactly once: the selected map of UnionCAM *is* one of the pool members' maps, so
when the members are scored anyway its numbers are gathered from theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.store.names import INS_DEL_METRICS, ROAD_METRICS, member_metric

if TYPE_CHECKING:  # torch comes with the model, in the actor
    import torch
    from torch import nn

    from unioncam.cam import CAMResult
    from unioncam.engine import Engine

__all__ = ["batch_metrics", "evaluate_batch"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float32, copy=False)


def evaluate_batch(
    engine: nn.Module | Engine,
    x: torch.Tensor,
    result: CAMResult,
    *,
    all_members: bool = False,
    step: int = 224,
    chunk_size: int | None = None,
    insertion_baseline: str | torch.Tensor = "blur",
    deletion_baseline: str | torch.Tensor = "zeros",
    autocast: str | None = None,
) -> dict[str, np.ndarray]:
    """Insertion/deletion AUC of a UnionCAM batch result, per image, as numpy vectors.

    Returns ``insertion``, ``deletion`` and ``ins_minus_del`` (shape ``N``) of the selected
    map, scored for the class UnionCAM explained (``result.target``). With
    ``all_members=True`` also ``<metric>@<member>`` for every pool member (needs
    ``result.components``, i.e. UnionCAM run with ``return_components=True``); the selected
    map's values are then taken from its member's (same map, same numbers) so the batch
    costs ``2·N·P·(steps−1)`` forwards rather than ``2·N·(P+1)·(steps−1)``.

    ``engine``: the CAM that made ``result`` (its engine: the metric forwards then run with
    the CAM's tuned chunk size, memory format and precision, and leave them as they are) or
    a bare model (then ``chunk_size``/``autocast`` apply). ``step`` is RISE's pixels per step
    (224 at 224 px = 224 steps). ``x`` and ``result`` must be the batch UnionCAM was run on,
    on the model's device.
    """
    import torch

    from unioncam.cam import CAMResult

    if not isinstance(result, CAMResult) or result.selected is None:
        raise ValueError(
            f"evaluate_batch: result must be a UnionCAM CAMResult, got {type(result).__name__}"
        )
    if x.shape[0] != len(result):
        raise ValueError(
            f"evaluate_batch: x has {x.shape[0]} images but the result explains {len(result)}"
        )
    from unioncam.metrics import insertion_deletion

    kw: dict[str, Any] = dict(
        targets=result.target,
        step=step,
        chunk_size=chunk_size,
        insertion_baseline=insertion_baseline,
        deletion_baseline=deletion_baseline,
        autocast=autocast,
    )
    out: dict[str, np.ndarray] = {}
    if not all_members:
        r = insertion_deletion(engine, x, result.maps, **kw)
        ins, dele = r.insertion, r.deletion
    else:
        comps = result.components
        missing = [p for p in result.pool if comps is None or p not in comps]
        if missing:
            raise ValueError(
                "evaluate_batch: all_members=True needs every pool member's map (missing "
                f"{missing[0]!r}); run UnionCAM with return_components=True"
            )
        assert comps is not None
        stacked = torch.stack([comps[p] for p in result.pool], 1)
        r = insertion_deletion(engine, x, stacked, **kw)
        sel = result.selected.to(r.insertion.device).long()[:, None]
        ins, dele = r.insertion.gather(1, sel)[:, 0], r.deletion.gather(1, sel)[:, 0]
        for j, p in enumerate(result.pool):
            out[member_metric("insertion", p)] = _np(r.insertion[:, j])
            out[member_metric("deletion", p)] = _np(r.deletion[:, j])
            out[member_metric("ins_minus_del", p)] = _np(r.insertion[:, j] - r.deletion[:, j])
    head = {
        "insertion": _np(ins),
        "deletion": _np(dele),
        "ins_minus_del": _np(ins - dele),
    }
    return {**head, **out}


def batch_metrics(
    cam: Any,
    primary: str,
    x: torch.Tensor,
    results: Mapping[str, Any],
    wanted: tuple[str, ...],
    *,
    step: int,
    all_members: bool = False,
) -> dict[str, np.ndarray]:
    """The stored metrics of each method's maps on one batch (extra forwards).

    Named like the store's ``metrics/<name>`` arrays: bare for the ``primary`` method,
    ``<metric>@<method>`` for the others (``<metric>@<pool member>`` for UnionCAM's members
    with ``all_members``). Scored through the primary ``cam``'s engine: its tuned chunk
    size, memory format and precision, its hook off, the model's state untouched. Costs per
    image and method: average drop / increase 1 forward; ROAD 18; insertion + deletion
    ``2 * ceil(S*S / step)``.
    """
    if not wanted:
        return {}
    from unioncam import metrics as M
    from unioncam.road import road

    want = set(wanted)
    out: dict[str, np.ndarray] = {}
    for method, res in results.items():
        def named(metric: str, method=method) -> str:
            return metric if method == primary else member_metric(metric, method)

        if {named("average_drop"), named("increase")} & want:
            drop, inc = M.average_drop_increase(cam, x, res.maps, targets=res.target)
            for metric, v in (("average_drop", drop), ("increase", inc)):
                if named(metric) in want:
                    out[named(metric)] = v.float().cpu().numpy()
        if {named(k) for k in ROAD_METRICS} & want:
            r = road(cam, x, res.maps, targets=res.target)
            for k, v in (("road_morf", r.morf), ("road_lerf", r.lerf), ("road", r.road)):
                out[named(k)] = v.float().cpu().numpy()
        if not {named(k) for k in INS_DEL_METRICS} & want and not (
            method == "unioncam" and all_members
        ):
            continue
        if method == "unioncam":
            # the selected map (and every pool member with all_members)
            ev = evaluate_batch(cam, x, res, all_members=all_members, step=step)
            out.update({named(k) if "@" not in k else k: v for k, v in ev.items()})
        else:
            r = M.insertion_deletion(cam, x, res.maps, targets=res.target, step=step)
            ins, dele = r.insertion.float().cpu().numpy(), r.deletion.float().cpu().numpy()
            out.update({named("insertion"): ins, named("deletion"): dele,
                        named("ins_minus_del"): ins - dele})  # fmt: skip
    return {k: v for k, v in out.items() if k in want}
