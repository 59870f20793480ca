"""A node lost mid-run, and a driver killed and started again, on a real 3-node Ray cluster.

The cluster (``ray.cluster_utils.Cluster``: a head with no CPUs and two worker nodes of one
CPU each, every node its own raylet and object store, bound to 127.0.0.1) runs on this
machine; two actors of one CPU land one per worker node. The driver is the real CLI in its
own process (``--address``), with the ``null`` explainer and a delay per unit so that it can
be hurt mid-run. First the driver is killed with SIGKILL and the same command started again:
it takes the dead driver's lease over. Then one worker node is killed (its raylet, its
actor, its object store): its units are redone on the other node, every unit has one marker,
passes, and the run's summary names the lost node (by the node id each actor reported
when it started: Ray reports the actor of a SIGKILLed node as ``ActorUnavailableError``
without its node, so the driver asks Ray which of its actors' nodes are dead at the end).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
pytest.importorskip("ray")

#: The slow end-to-end tier (`python -m pytest -m slow`; .ci/run runs it).
pytestmark = pytest.mark.slow

from pipeline.data.build import build_from_list  # noqa: E402
from pipeline.data.decode import Status  # noqa: E402
from pipeline.store.io import open_store  # noqa: E402
from pipeline.store.lease import read_lease  # noqa: E402
from pipeline.store.units import done_units, read_markers  # noqa: E402
from pipeline.store.verify import verify_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N, UNIT = 32, 2

#: The real CLI entry point; only the unit delay (a fault-injection setting, not part of the
#: store's fingerprint) is added to the configuration the command line builds.
CLI = """\
import sys
from pipeline import cli
from pipeline.config import FaultInjection
build = cli._config_from_args
cli._config_from_args = lambda a: build(a).replace(
    fault_injection=FaultInjection(unit_delay_s=float(sys.argv[1])))
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "include_dashboard": False,
                        "node_ip_address": "127.0.0.1",
                        # the GCS marks a dead node within ~2 s (default: ~30 s)
                        "_system_config": {"health_check_period_ms": 500,
                                           "health_check_timeout_ms": 500,
                                           "health_check_failure_threshold": 3}},
    )  # fmt: skip
    workers = [c.add_node(num_cpus=1, resources={f"worker_{i}": 1},
                          node_ip_address="127.0.0.1") for i in range(2)]  # fmt: skip
    c.wait_for_nodes()
    try:
        yield c, workers
    finally:
        c.shutdown()


def _driver(tmp: Path, address: str) -> subprocess.Popen:
    script = tmp / "unioncam_cli.py"
    script.write_text(CLI)
    argv = ["run", str(tmp / "m.parquet"), str(tmp / "s.zarr"), "--explainer", "null",
            "--image-size", "16", "--cpu", "--actors", "2", "--cpus-per-actor", "1",
            "--address", address, "--no-progress", "--no-ray-metrics"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    env.pop("UNIONCAM_DEBUG", None)
    env.pop("RAY_ADDRESS", None)
    # Every node of this cluster listens on 127.0.0.1, but a driver on Linux rewrites a
    # 127.0.0.1 address to the machine's IP ("remotely reachable") before connecting;
    # Ray's switch for a single-machine cluster keeps it on the loopback.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return subprocess.Popen(
        [sys.executable, str(script), "2.0", *argv], cwd=tmp, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _kill_node(c, node) -> None:
    """The node is gone, as a crashed machine would be: SIGKILL to its raylet, its object
    store and every worker process under it (the actor), not a graceful drain."""
    import psutil
    from ray._private import ray_constants

    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    workers = raylet.children(recursive=True)
    assert workers, "no worker process on the node to kill"
    c.remove_node(node, allow_graceful=False)  # SIGKILL to its raylet and the rest
    for w in workers:
        try:
            w.kill()
        except psutil.NoSuchProcess:
            pass


def _wait_units(store: Path, proc: subprocess.Popen, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the driver ended early:\n{proc.stderr.read()[-3000:]}")
        try:
            if len(done_units(str(store))) >= n:
                return
        except Exception:  # the store is being created
            pass
        time.sleep(0.2)
    pytest.fail(f"fewer than {n} units finished in time")


def test_a_lost_node_and_a_killed_driver_lose_nothing_and_double_nothing(
    tmp_path, sample_dir, cluster
):
    c, workers = cluster
    with open(sample_dir / "labels.csv", newline="") as fh:
        rows = [(str(sample_dir / r["file"]), int(r["class_index"])) for r in csv.DictReader(fh)]
    rows = [rows[i % len(rows)] for i in range(N)]
    build_from_list(rows, tmp_path / "m.parquet", unit_size=UNIT)
    store = tmp_path / "s.zarr"

    first = _driver(tmp_path, c.address)
    try:
        _wait_units(store, first, 1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # kill -9 of the driver (the cluster lives on)
        first.wait()
    # Its actors die with their owner, but a unit they were writing may still land: read
    # the markers once they stop changing.
    before = None
    while before != (now := {u: m["written_at"] for u, m in read_markers(str(store)).items()}):
        before = now
        time.sleep(4)
    before = {u: m["written_at"] for u, m in read_markers(str(store)).items()}
    assert read_lease(str(store))["pid"] == first.pid

    second = _driver(tmp_path, c.address)  # the same command again
    try:
        _wait_units(store, second, len(before) + 1)
        lost = workers[0]
        _kill_node(c, lost)
        out, err = second.communicate(timeout=300)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
    assert second.returncode == 0, err[-3000:]
    assert f"took over the lease of driver pid {first.pid}" in err
    assert "actors replaced: 1" in out and "[died]" in out, out  # the lost node's actor
    assert f"nodes lost (their units were redone elsewhere): {lost.node_id[:12]}" in out, out
    assert "the store is complete" in out

    after = read_markers(str(store))
    assert sorted(after) == list(range(N // UNIT))  # every unit, one marker each
    assert all(after[u]["written_at"] == t for u, t in before.items())  # not redone
    g = open_store(str(store))
    assert (np.asarray(g["status"][:]) == int(Status.OK)).all()
    assert verify_store(str(store), deep=True).ok
    assert read_lease(str(store)) is None
