"""What a run did: per-actor aggregates and the summary :func:`pipeline.run.driver.run` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ActorStats", "RunSummary"]


@dataclass
class ActorStats:
    """What one actor did (aggregates only)."""

    actor: int
    host: str = ""
    #: The Ray node id the actor ran on (what names a lost node).
    node: str = ""
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
    #: Ray nodes that held an actor of this run and were dead at its end: ``id (host)``.
    lost_nodes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    actors: list[ActorStats] = field(default_factory=list)
    interrupted: bool = False
    #: ``(row id, uri, status, message)`` of the first :data:`MAX_FAILED_ROWS` failed images.
    failed_rows: list[tuple[int, str, str, str]] = field(default_factory=list)
    #: The wall time split: ``startup_s`` (Ray: ``ray_s``; the first actor's process,
    #: model and tuning: ``actor_startup_s``), ``explain_s`` (first actor ready to last
    #: unit written) and ``finish_s`` (stopping actors and Ray, consolidating the store).
    ray_s: float = 0.0
    actor_startup_s: float = 0.0
    startup_s: float = 0.0
    explain_s: float = 0.0
    finish_s: float = 0.0

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
        if self.startup_s or self.explain_s:
            lines.append(
                f"time: start-up {self.startup_s:.1f} s (Ray {self.ray_s:.1f} s, first actor "
                f"{self.actor_startup_s:.1f} s) + explaining {self.explain_s:.1f} s"
                + (f" = {self.images_processed / self.explain_s:.2f} images/s"
                   if self.explain_s > 0 else "")
                + f" + finishing {self.finish_s:.1f} s"
            )  # fmt: skip
        bad = {k: v for k, v in sorted(self.status_counts.items()) if k != "OK" and v}
        if bad:
            lines.append(
                "failed images by status: " + ", ".join(f"{k}={v}" for k, v in bad.items())
            )
            for row, uri, status, message in self.failed_rows:
                lines.append(f"  row {row} {uri or '<inline image>'}: {status}: {message}")
            if self.images_failed > len(self.failed_rows):
                lines.append(
                    f"  ... {self.images_failed - len(self.failed_rows)} more: "
                    f"unioncam export {self.store} --csv FILE lists every row with its status"
                )
        if self.retries or self.actors_replaced:
            lines.append(f"retries: {self.retries}; actors replaced: {self.actors_replaced}")
        if self.lost_nodes:
            lines.append("nodes lost (their units were redone elsewhere): "
                         + ", ".join(self.lost_nodes))  # fmt: skip
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

