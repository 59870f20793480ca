"""SIGTERM and SIGHUP stop a run the way Ctrl-C does.

Why: SIGTERM is how Kubernetes, KubeRay and Slurm stop a job (then SIGKILL after a grace
period), and SIGHUP is what a closed terminal or ssh session sends. Left to their defaults,
the driver dies without releasing the lease or recording the run state; and once Ray is
initialised its C++ core worker has a failure-signal handler on SIGTERM that prints a stack
dump ("*** SIGTERM received ***") and ends in SIGABRT (exit 134): a clean stop that looks
like a crash. So during :func:`pipeline.run.driver.run` both signals raise :class:`Stopped`
(a ``KeyboardInterrupt``) in the main thread, and the driver's Ctrl-C path does the rest:
no more units are handed out, the actors are killed (a unit without its marker is redone by
the next run), the run state is recorded, the lease is released. The CLI then exits with
128 + the signal's number (143 for SIGTERM, 129 for SIGHUP), as a shell reports a process
killed by that signal.

Ray replaces SIGTERM's handler in ``ray.init`` (a Python one, then the core worker's C++
one), so :func:`reinstall` must be called after ``ray.init``: a Python handler set later
replaces the C++ one at the ``sigaction`` level, which is what keeps the dump away.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["STOP_SIGNALS", "Stopped", "reinstall", "stop_on_signals", "stopped_line",
           "why_stopped"]

#: The signals a cluster (or a closed terminal) sends to stop a job.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal; the process should exit with :attr:`exit_code`."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        #: True once the driver printed the one line about it (the CLI adds nothing then).
        self.reported = False
        super().__init__(f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state: dict[str, Any] = {"active": 0, "stopped": None}


def _handler(signum: int, frame: Any) -> None:
    # Raise once: a second SIGTERM while the driver is stopping (some supervisors repeat
    # it) must not interrupt the cleanup that releases the lease and records the state.
    if _state["stopped"] is not None:
        return
    _state["stopped"] = Stopped(signum)
    raise _state["stopped"]


def why_stopped(e: KeyboardInterrupt) -> KeyboardInterrupt:
    """The :class:`Stopped` behind ``e`` if a stop signal arrived, else ``e`` (Ctrl-C).

    Needed because Ray turns an exception raised by a signal handler while the main thread
    waits in ``ray.wait``/``ray.get`` into a new, plain ``KeyboardInterrupt``: the signal
    is known only from what the handler recorded.
    """
    if isinstance(e, Stopped):
        return e
    return _state["stopped"] or e


def reinstall() -> None:
    """Put our handlers back (after ``ray.init``, which installs Ray's own on SIGTERM)."""
    if _state["active"] and threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _handler)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Stopped` in the main thread.

    The previous handlers are restored on exit. Outside the main thread (where Python
    cannot set handlers) this does nothing: the embedding program owns its signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _state["active"] += 1
    if _state["active"] == 1:
        _state["stopped"] = None
    try:
        reinstall()
        yield
    finally:
        _state["active"] -= 1
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def stopped_line(e: BaseException, done: int, total: int, store: str, redo: int) -> str:
    """The one line the driver prints when a run stops early (a signal or Ctrl-C)."""
    if isinstance(e, Stopped):
        return (
            f"stopped by {e.name}: {done} of {total} units done; rerun the same command to "
            "resume"
        )
    return (
        f"interrupted: {done} of {total} units are complete in {store}; rerun the same "
        "command to resume (finished units are skipped"
        + (f"; the {redo} images explained in unfinished units are redone)" if redo else ")")
    )
