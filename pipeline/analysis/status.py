"""Where a run stands: the ``unioncam status`` view of a store, and the driver's liveness.

Why apart from the reader: the reader only reads what the store holds; telling "in
progress" from "interrupted" also asks the operating system whether the driver that
recorded ``run_state`` is still alive (``os.kill(pid, 0)`` on its host), and reads the
lease: facts about processes, not about the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.analysis.reader import StoreReader
from pipeline.data.decode import Status
from pipeline.store.lease import describe_lease, read_lease
from pipeline.store.names import MAX_FAILED_ROWS, status_name, text
from pipeline.store.units import done_units

__all__ = ["StoreStatus", "run_state_text", "store_status"]


@dataclass
class StoreStatus:
    """Where a run stands (from markers and the status array)."""

    store: str
    num_rows: int
    num_units: int
    units_done: int
    rows_done: int
    rows_by_status: dict[str, int]
    complete: bool
    attrs: dict[str, Any] = field(default_factory=dict)
    #: finished / in progress (...) / interrupted / incomplete (see ``StoreReader.status``)
    state: str = ""
    #: ``(row id, uri, status, message)`` of the first failed rows (at most 10).
    failed_rows: list[tuple[int, str, str, str]] = field(default_factory=list)
    #: the driver lease (host, pid, started_at, heartbeat, ...), None when no driver holds it
    lease: dict[str, Any] | None = None

    def format(self) -> str:
        a = self.attrs
        state = self.state or ("finished" if self.complete else "incomplete")
        lines = [
            f"store: {self.store}",
            f"state: {state}",
            f"units: {self.units_done} of {self.num_units} done",
            f"rows:  {self.rows_done} of {self.num_rows} written",
            "driver lease: " + (describe_lease(self.lease) if self.lease else "free"),
        ]
        if self.rows_by_status:
            lines.append(
                "rows by status: "
                + ", ".join(f"{k}={v}" for k, v in sorted(self.rows_by_status.items()))
            )
        for row, uri, status, message in self.failed_rows:
            lines.append(f"  row {row} {uri or '<inline image>'}: {status}: {message}")
        failed = sum(v for k, v in self.rows_by_status.items() if k != "OK")
        if failed > len(self.failed_rows):
            lines.append(
                f"  ... {failed - len(self.failed_rows)} more failed rows: unioncam export "
                f"{self.store} --csv FILE lists every row with its file and status"
            )
        if a:
            lines.append(
                f"model: {a.get('model')} ({a.get('weights')}), layer {a.get('layer')}, "
                f"image size {a.get('image_size')}, explainer {a.get('explainer', 'unioncam')}"
            )
            if a.get("methods"):
                lines.append("methods: " + ", ".join(a["methods"]))
            if a.get("pool"):
                lines.append("pool: " + ", ".join(a["pool"]))
            if a.get("manifest"):
                lines.append(f"manifest: {a['manifest']}")
        return "\n".join(lines)


def store_status(reader: StoreReader) -> StoreStatus:
    """Where a run stands: units done (a fresh listing: a run may be writing), rows by
    status, the first failed rows, the run state with the driver's liveness, the lease."""
    done = sorted(done_units(reader.path, storage_options=reader.storage_options))
    rows = reader.rows_of(done)
    # One read of the whole uint8 column (1.3 MB for ImageNet train, its chunks fetched
    # concurrently), not a read per unit.
    st = np.asarray(reader.group["status"][:])[rows]
    counts = {status_name(v): int(c) for v, c in enumerate(np.bincount(st, minlength=256))
              if c}  # fmt: skip
    bad = rows[st != int(Status.OK)][:MAX_FAILED_ROWS]
    failed = [(int(r), text(np.asarray(reader.group["uri"][r]).item()),
               status_name(reader.group["status"][r]),
               text(np.asarray(reader.group["error"][r]).item())) for r in bad.tolist()]  # fmt: skip
    rows_done = int(len(rows))
    run_state = run_state_text(reader.attrs, len(done) == reader.num_units)
    keep = {
        k: reader.attrs.get(k)
        for k in (
            "model",
            "weights",
            "layer",
            "image_size",
            "methods",
            "pool",
            "manifest",
            "explainer",
            "target",
        )
        if k in reader.attrs
    }
    return StoreStatus(
        store=reader.path,
        num_rows=reader.num_rows,
        num_units=reader.num_units,
        units_done=len(done),
        rows_done=rows_done,
        rows_by_status=counts,
        complete=len(done) == reader.num_units,
        attrs=keep,
        state=run_state,
        failed_rows=failed,
        lease=read_lease(reader.path, storage_options=reader.storage_options),
    )


def run_state_text(attrs: dict[str, Any], complete: bool) -> str:
    """finished / in progress / interrupted / incomplete, from the driver's attributes."""
    import socket

    rs = attrs.get("run_state") or {}
    state = rs.get("state", "")
    if complete:
        return "finished"
    if state == "running":
        where = f"driver pid {rs.get('pid')} on {rs.get('host')}, since {rs.get('at')}"
        if rs.get("host") == socket.gethostname() and rs.get("pid"):
            try:
                os.kill(int(rs["pid"]), 0)
            except ProcessLookupError:
                return f"interrupted (the driver, {where}, is gone); rerun to resume"
            except OSError:
                pass
        return f"in progress ({where})"
    if state in ("interrupted", "failed", "incomplete"):
        detail = f": {rs['detail']}" if rs.get("detail") else ""
        return f"{state}{detail}; rerun the same command to resume"
    return "incomplete"

