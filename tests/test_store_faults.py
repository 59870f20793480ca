"""Trusting a store through real faults: a shard lost after the run, a second driver, a
driver killed with SIGKILL (mid-run and while finalising), a full disk.

Everything is real: runs on a local Ray cluster, Zarr stores on disk, drivers killed with
``kill -9`` in their own process group (the driver and the Ray processes it started), a
tmpfs of a few hundred KiB for the full disk. Kept small: 8 rows in units of 2 or 4, 64 px,
the ``fast`` preset; the driver-process tests use the ``null`` explainer (no model), since
what they test is the driver and the store, not the maps.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

#: The slow end-to-end tier (`python -m pytest -m slow`; .ci/run runs it).
pytestmark = pytest.mark.slow

from pipeline.analysis.reader import open_reader  # noqa: E402
from pipeline.analysis.status import store_status  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.data.build import build_from_list  # noqa: E402
from pipeline.data.decode import Status  # noqa: E402
from pipeline.run.driver import run  # noqa: E402
from pipeline.store.io import open_store  # noqa: E402
from pipeline.store.lease import LeaseHeldError, read_lease  # noqa: E402
from pipeline.store.units import done_units, read_markers  # noqa: E402
from pipeline.store.verify import verify_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N = 8
SIZE = 64
ARRAYS = ("maps", "beta", "selected", "selection_score", "target", "prob", "baseline_prob",
          "status", "label", "orig_size", "crop_box", "error")  # fmt: skip


def _rows(sample_dir: Path, n: int) -> list[tuple[str, int]]:
    with open(sample_dir / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [(str(sample_dir / r["file"]), int(r["class_index"])) for r in rows[:n]]


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def config(manifest: Path, store: Path, null: bool = False, **kw) -> RunConfig:
    """A tiny run: the ``fast`` preset at 64 px, or the ``null`` explainer (no model) where
    only the writes matter."""
    from unioncam import UnionCAMConfig

    base = {
        "manifest": str(manifest),
        "store": str(store),
        "image_size": SIZE,
        "batch_size": 4,
        "actors": 1,
        "cpu_only": True,
        "progress": False,
    }
    if null:
        base["explainer"] = "null"
    else:
        base["preset"] = UnionCAMConfig.preset("fast", groups=4, chunk_size=16).to_dict()
    return RunConfig(**{**base, **kw})


def read_all(store: Path) -> dict[str, np.ndarray]:
    g = open_store(str(store))
    return {n: np.asarray(g[n][:]) for n in ARRAYS}


def test_a_deleted_shard_is_found_repaired_and_the_rerun_equals_the_untouched_store(
    ray_cluster, tmp_path, sample_dir, capsys
):
    m = build_from_list(_rows(sample_dir, N), tmp_path / "m.parquet", unit_size=4)
    store = tmp_path / "s.zarr"
    assert run(config(m.uri, store)).complete
    untouched = read_all(store)
    assert (untouched["status"] == int(Status.OK)).all()
    assert main(["verify", str(store), "--deep"]) == 0
    capsys.readouterr()

    (store / "maps" / "c" / "1" / "0" / "0").unlink()  # unit 1's shard of maps, lost
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "BAD unit 1: maps/c/1/0/0 is missing" in out and "BAD unit 0" not in out
    before = read_markers(str(store))[0]
    assert main(["verify", str(store), "--repair"]) == 1
    assert done_units(str(store)) == {0}

    again = run(config(m.uri, store))  # the same command
    assert again.units_processed == 1 and again.units_already_done == 1 and again.complete
    assert read_markers(str(store))[0] == before  # unit 0 was not redone
    r = open_reader(str(store)).verify(deep=True)
    assert r.ok and r.units_checked == 2 and not r.unchecked, r.lines()
    repaired = read_all(store)
    for name in ARRAYS:
        a, b = repaired[name], untouched[name]
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, atol=2e-3, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


# ---------------------------------------------------------------------------------------
# drivers in their own processes
DRIVER = """\
import json, sys
{patch}
from pipeline.config import RunConfig
from pipeline.run.driver import run
run(RunConfig.from_dict(json.loads(sys.argv[1])))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    env.pop("UNIONCAM_DEBUG", None)
    return env


def _driver(cfg: dict, tmp: Path, patch: str = "", **popen) -> subprocess.Popen:
    script = tmp / f"driver{abs(hash(patch))}.py"
    script.write_text(DRIVER.format(patch=patch))
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(cfg)], cwd=tmp, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **popen,
    )  # fmt: skip


def _null_config(tmp: Path, sample_dir: Path, unit: int = 2, **kw) -> dict:
    m = build_from_list(_rows(sample_dir, N), tmp / "m.parquet", unit_size=unit)
    return {"manifest": str(m.uri), "store": str(tmp / "s.zarr"), "explainer": "null",
            "image_size": SIZE, "actors": 1, "cpu_only": True, "progress": False,
            "dashboard": False, "ray_metrics": False, **kw}  # fmt: skip


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_second_driver_is_refused_and_after_kill_9_the_same_command_takes_over(
    ray_cluster, tmp_path, sample_dir, capsys
):
    cfg = _null_config(tmp_path, sample_dir, fault_injection={"unit_delay_s": 3.0})
    store = Path(cfg["store"])
    first = _driver(cfg, tmp_path)
    try:
        _wait_for(lambda: len(done_units(str(store))) >= 1, 180, "the first driver's first unit")
        holder = read_lease(str(store))
        assert holder and holder["pid"] == first.pid
        # A second driver on the live store (here, in this process: it is refused before
        # it starts anything): one line naming the holder; the first is not disturbed.
        with pytest.raises(LeaseHeldError) as e:
            run(RunConfig.from_dict(cfg))
        assert f"is in use by driver pid {first.pid} on " in str(e.value)
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # kill -9 of the driver and its Ray
        first.wait()
    # Read after the kill: a unit can finish between any earlier read and the kill (seen:
    # a second marker landed in that window and the count below was off by one).
    done_before = {u: m["written_at"] for u, m in read_markers(str(store)).items()}
    assert 1 <= len(done_before) < N // 2
    assert read_lease(str(store))["pid"] == first.pid  # a dead holder's lease is left

    capsys.readouterr()
    s = run(RunConfig.from_dict(cfg))  # the same command again (here on this test's Ray)
    err = capsys.readouterr().err
    assert f"took over the lease of driver pid {first.pid}" in err
    assert "its process is gone" in err
    done_after = read_markers(str(store))
    # Every row explained once: the units done before the kill were not redone, the
    # others were done by the new driver, and the store is whole.
    assert s.complete and s.units_processed == N // 2 - len(done_before)
    assert all(done_after[u]["written_at"] == t for u, t in done_before.items())
    assert sorted(done_after) == list(range(N // 2))
    assert (open_store(str(store))["status"][:] == int(Status.OK)).all()
    assert verify_store(str(store), deep=True).ok
    assert read_lease(str(store)) is None


def test_a_driver_killed_while_finalising_leaves_a_store_the_rerun_finishes(
    tmp_path, sample_dir
):
    cfg = _null_config(tmp_path, sample_dir)
    store = Path(cfg["store"])
    # The driver dies (as kill -9 would: no cleanup) inside consolidate_metadata, after
    # the last unit and after the summary attributes were written.
    dying = _driver(
        cfg, tmp_path, "import os, zarr\nzarr.consolidate_metadata = lambda *a, **k: os._exit(9)"
    )
    out, err = dying.communicate(timeout=300)
    assert dying.returncode == 9, err
    markers = read_markers(str(store))
    assert sorted(markers) == list(range(N // 2))
    root = json.loads((store / "zarr.json").read_text())
    assert "consolidated_metadata" not in root or root["consolidated_metadata"] is None
    assert read_lease(str(store))["pid"] == dying.pid

    # The same command again (in this process: with every unit done it starts no Ray).
    s = run(RunConfig.from_dict(cfg))
    assert (s.units_processed, s.units_already_done, s.complete) == (0, N // 2, True)
    assert read_markers(str(store)) == markers  # nothing redone, nothing lost
    root = json.loads((store / "zarr.json").read_text())
    assert root["consolidated_metadata"]["metadata"]["maps"]
    consolidated = root["consolidated_metadata"]["metadata"]
    assert "lease" not in consolidated  # no stale holder in the snapshot
    assert "markers" in consolidated and not any(k.startswith("markers/") for k in consolidated)
    assert open_reader(str(store)).done_units() == set(range(N // 2))  # listed, as ever
    assert root["attributes"]["summary"]["complete"]
    st = store_status(open_reader(str(store)))
    assert st.complete and st.state == "finished" and st.lease is None
    assert st.rows_by_status == {"OK": N}
    assert verify_store(str(store), deep=True).ok


# ---------------------------------------------------------------------------------------
# a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs (needs root; skipped with one line without it)."""
    import shutil

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_the_unit_in_one_line_and_the_rerun_after_freeing_space_completes(
    ray_cluster, tmp_path, sample_dir, small_disk
):
    m = build_from_list(_rows(sample_dir, N), tmp_path / "m.parquet", unit_size=4)
    store = small_disk / "s.zarr"
    first = run(config(m.uri, store, max_units=1, null=True))
    assert first.units_processed == 1
    # Fill the disk, leaving room for the driver's own small writes (lease, attributes)
    # but not for a unit's shards.
    ballast = small_disk / "ballast"
    st = os.statvfs(small_disk)
    ballast.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - 16 * 1024))
    s = run(config(m.uri, store, max_retries=1, null=True))
    assert list(s.failed_units) == [1] and not s.complete
    reason = s.failed_units[1]
    assert "\n" not in reason and "No space left on device" in reason, reason
    assert f"unit 1: cannot write to store {store}" in reason
    assert "FAILED unit 1:" in s.format()
    assert done_units(str(store)) == {0}  # never marked done
    assert verify_store(str(store)).ok  # and the finished unit is intact

    ballast.unlink()  # space freed: the same command completes
    again = run(config(m.uri, store, null=True))
    assert again.complete and again.units_processed == 1
    assert verify_store(str(store), deep=True).ok
    assert (open_store(str(store))["status"][:] == int(Status.OK)).all()


# ---------------------------------------------------------------------------------------
# object storage under faults
@pytest.mark.slow
def test_a_run_on_faulty_s3_explains_every_row_once_and_a_unit_that_cannot_be_written_fails(
    ray_cluster, tmp_path, sample_dir, capsys
):
    """Connection resets, 500s, 503s, slow answers and requests the server applied but the
    client never heard back about (dropped, or held past the client's read timeout), on
    every request of the driver, the actors and verify; and every write of unit 1 refused
    (503) in the first run."""
    pytest.importorskip("moto")
    from faultproxy import ACTIONS, FaultProxy
    from s3server import S3Server

    m = build_from_list(_rows(sample_dir, N), tmp_path / "m.parquet", unit_size=2)
    with S3Server() as s3, FaultProxy(
        s3.endpoint_url, rate=0.08, seed=3, hold_s=2.5, max_per_action=6,
        fail_always=r"/c/1(/|$)",
    ) as proxy:  # fmt: skip
        so = {**s3.storage_options, "endpoint_url": proxy.url,
              # bounded retries: botocore 3 attempts per request (s3fs adds up to 5 more
              # for throttling and connection errors), a short read timeout
              "config_kwargs": {"read_timeout": 2, "connect_timeout": 2,
                                "retries": {"max_attempts": 3, "mode": "standard"}}}  # fmt: skip
        store = f"{s3.make_bucket()}/out/s.zarr"
        cfg = RunConfig(manifest=str(m.uri), store=store, explainer="null", image_size=SIZE,
                        actors=1, cpu_only=True, progress=False, storage_options=so,
                        max_retries=1)  # fmt: skip
        first = run(cfg)
        assert list(first.failed_units) == [1] and first.units_processed == N // 2 - 1
        assert "cannot write to store" in first.failed_units[1] or "SlowDown" in (
            first.failed_units[1]
        )
        err = capsys.readouterr().err
        assert "unit 1: attempt 1 failed" in err and "unit 1 failed 2 times" in err
        assert done_units(store, so) == {0, 2, 3}  # never marked done
        refused = sum(1 for _m, _p, a in proxy.requests if a == "fail-always")
        # bounded: 2 unit attempts x 13 arrays x (3 botocore attempts x 5 s3fs retries)
        assert 0 < refused <= 2 * 13 * 3 * 5
        print("unit 1:", first.failed_units[1], "| requests refused:", refused)

        proxy.fail_always = None  # the cause is gone; the random faults stay
        before = read_markers(store, so)
        second = run(cfg)
        assert second.complete and second.units_processed == 1
        after = read_markers(store, so)
        assert sorted(after) == list(range(N // 2))
        assert all(after[u] == before[u] for u in before)  # done once, never redone
        r = verify_store(store, so, deep=True)
        assert r.ok and r.units_checked == N // 2 and not r.unchecked, r.lines()
        g = open_store(store, storage_options=so)
        assert (np.asarray(g["status"][:]) == int(Status.OK)).all()
        assert read_lease(store, so) is None
        injected = {a for _m, _p, a in proxy.requests} - {"pass", "fail-always"}
        assert injected == set(ACTIONS), proxy.counts  # every kind of fault happened


#: A real ``unioncam analyze`` process, slowed before it describes the units (so that it
#: holds the lease long enough for a driver to be refused meanwhile).
SLOW_ANALYZE = """\
import sys, time
from pipeline.analysis import store_analysis
describe = store_analysis._run_units
def slow(*a, **k):
    time.sleep(float(sys.argv[1]))
    return describe(*a, **k)
store_analysis._run_units = slow
from pipeline.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_analyze_is_refused_while_a_run_holds_the_lease_and_a_run_while_analyze_does(
    ray_cluster, tmp_path, sample_dir, capsys
):
    cfg = _null_config(tmp_path, sample_dir, fault_injection={"unit_delay_s": 3.0})
    store = Path(cfg["store"])
    first = _driver(cfg, tmp_path)
    try:
        _wait_for(lambda: len(done_units(str(store))) >= 1, 180, "the driver's first unit")
        capsys.readouterr()
        assert main(["analyze", str(store), "--groups", "class"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("unioncam analyze: error: store "), err
        assert f"is in use by driver pid {first.pid} on " in err[0]
        assert first.poll() is None  # the run is not disturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert main(["run", cfg["manifest"], str(store), "--explainer", "null", "--cpu",
                 "--image-size", str(SIZE), "--actors", "1", "--no-progress"]) == 0

    script = tmp_path / "slow_analyze.py"
    script.write_text(SLOW_ANALYZE)
    analyzer = subprocess.Popen(
        [sys.executable, str(script), "20", "analyze", str(store), "--groups", "class"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (read_lease(str(store)) or {}).get("pid") == analyzer.pid, 60,
                  "analyze to take the lease")  # fmt: skip
        capsys.readouterr()
        assert main(["run", cfg["manifest"], str(store), "--explainer", "null", "--cpu",
                     "--image-size", str(SIZE), "--actors", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("unioncam run: error: store "), err
        assert f"is in use by unioncam analyze pid {analyzer.pid} on " in err[0]
        out, aerr = analyzer.communicate(timeout=180)
        assert analyzer.returncode == 0, aerr
    finally:
        if analyzer.poll() is None:
            os.killpg(analyzer.pid, signal.SIGKILL)
            analyzer.wait()
    assert read_lease(str(store)) is None
    assert open_reader(str(store)).analysis().complete
