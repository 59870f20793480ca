"""SIGTERM and SIGHUP to a real ``unioncam run``: what Kubernetes, KubeRay and Slurm send
before they stop a job, and what a closed terminal sends.

Real signals to a real CLI driver process (its own session, so the signal reaches only the
driver, as ``kill -TERM <pid>`` would; a background job of a non-interactive shell would
ignore SIGINT, which is why Ctrl-C is not the model here), which starts its own local Ray.
The ``null`` explainer (no model) with a delay per unit keeps the run small and slow enough
to be stopped in the middle. Checked: one line on stderr and no Ray stack dump, exit code
128 + signal, the lease released, the run state recorded, and the same command completes
the store without redoing the finished units.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
pytest.importorskip("ray")

#: The slow end-to-end tier (`python -m pytest -m slow`; .ci/run runs it).
pytestmark = pytest.mark.slow

from pipeline.data.build import build_from_list  # noqa: E402
from pipeline.store.io import open_store  # noqa: E402
from pipeline.store.lease import read_lease  # noqa: E402
from pipeline.store.units import done_units, read_markers  # noqa: E402
from pipeline.store.verify import verify_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N, UNIT = 8, 2

#: The real CLI entry point; only the unit delay (a fault-injection setting, not part of the
#: store's fingerprint) is added to the configuration the command line builds.
CLI = """\
import sys
from pipeline import cli
from pipeline.config import FaultInjection
build = cli._config_from_args
delay = float(sys.argv[1])
cli._config_from_args = lambda a: build(a).replace(
    fault_injection=FaultInjection(unit_delay_s=delay) if delay else None)
sys.exit(cli.main(sys.argv[2:]))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    env.pop("UNIONCAM_DEBUG", None)
    return env


def _unioncam_run(tmp: Path, delay: float) -> subprocess.Popen:
    script = tmp / "unioncam_cli.py"
    script.write_text(CLI)
    argv = ["run", str(tmp / "m.parquet"), str(tmp / "s.zarr"), "--explainer", "null",
            "--image-size", "16", "--cpu", "--actors", "1", "--no-progress",
            "--no-dashboard", "--no-ray-metrics"]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, str(script), str(delay), *argv], cwd=tmp, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _first_marker(store: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it was signalled:\n{proc.stderr.read()[-3000:]}")
        try:
            if done_units(str(store)):
                return
        except Exception:  # the store is being created
            pass
        time.sleep(0.2)
    pytest.fail("no unit finished in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_stops_the_run_in_one_line_and_the_same_command_resumes(
    tmp_path, sample_dir, sig
):
    with open(sample_dir / "labels.csv", newline="") as fh:
        rows = [(str(sample_dir / r["file"]), int(r["class_index"])) for r in csv.DictReader(fh)]
    build_from_list(rows[:N], tmp_path / "m.parquet", unit_size=UNIT)
    store = tmp_path / "s.zarr"

    proc = _unioncam_run(tmp_path, delay=3.0)
    try:
        _first_marker(store, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + int(sig), err
    done = read_markers(str(store))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    expected = (f"stopped by {name}: {len(done)} of {N // UNIT} units done; rerun the same "
                "command to resume")  # fmt: skip
    assert lines == [expected], err  # one line: no Ray stack dump, no traceback
    assert "*** SIGTERM received" not in err and "Traceback" not in err
    assert 1 <= len(done) < N // UNIT
    assert read_lease(str(store)) is None  # the lease was released
    state = open_store(str(store)).attrs["run_state"]
    assert (state["state"], state["detail"]) == ("interrupted", name)

    again = _unioncam_run(tmp_path, delay=0.0)  # the same command
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    after = read_markers(str(store))
    assert sorted(after) == list(range(N // UNIT))
    assert all(after[u]["written_at"] == m["written_at"] for u, m in done.items())  # not redone
    assert verify_store(str(store), deep=True).ok
    assert read_lease(str(store)) is None
    assert open_store(str(store)).attrs["run_state"]["state"] == "finished"
