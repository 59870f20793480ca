"""Trusting a store without a run: checksummed markers, ``verify`` and its repair, the
driver lease, on real Zarr stores on disk and on the loopback S3 server (no Ray here; the
runs are in test_store_faults.py).

The stores are written by :func:`pipeline.store.units.write_unit`, exactly as a worker writes
them, with random maps, so every unit has real shard objects to lose or corrupt.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.decode import Status
from pipeline.store.checksum import checksum
from pipeline.store.io import create_store, read_layout
from pipeline.store.layout import StoreLayout, marker_key
from pipeline.store.lease import LEASE, LeaseHeldError, StoreLease, read_lease
from pipeline.store.units import done_units, read_markers, write_unit
from pipeline.store.verify import verify_store

ROWS, UNIT, SIZE = 10, 4, 8
POOL = ("a", "b")


def make_store(path: str, storage_options=None, rows: int = ROWS, unit: int = UNIT) -> str:
    """A finished store: every unit written by write_unit (one bad image in unit 0)."""
    create_store(path, StoreLayout(num_rows=rows, unit_size=unit, image_size=SIZE, pool=POOL), storage_options=storage_options)  # fmt: skip
    layout = StoreLayout(num_rows=rows, unit_size=unit, image_size=(SIZE, SIZE), pool=POOL)
    rng = np.random.default_rng(0)
    for u in range(layout.num_units):
        start, stop = layout.unit_range(u)
        a = layout.empty_rows(stop - start)
        a["status"][:] = int(Status.OK)
        a["maps"][:] = rng.random((stop - start, SIZE, SIZE))
        a["beta"][:] = rng.random((stop - start, len(POOL)))
        a["selected"][:] = 1
        if u == 0:
            a["status"][0], a["selected"][0] = int(Status.CORRUPT), -1
            a["maps"][0] = np.nan
            a["error"][0] = "corrupt: bad huffman table"
        write_unit(path, read_layout(path, storage_options=storage_options), u, a, storage_options=storage_options)
    return path


def test_markers_record_every_object_written_with_size_and_crc32c(tmp_path):
    store = make_store(str(tmp_path / "s.zarr"))
    markers = read_markers(store)
    assert sorted(markers) == [0, 1, 2]
    m = markers[0]
    assert m["checksum"] == "crc32c"
    assert {"maps/c/0/0/0", "status/c/0", "beta/c/0/0", "error/c/0"} <= set(m["objects"])
    for key, entry in m["objects"].items():
        raw = (Path(store) / key).read_bytes()
        assert entry == {"size": len(raw), "crc32c": checksum(raw)}, key
    # chunks that are all fill value are not written: recorded as empty, and absent
    assert "prob/c/0" in m["empty"] and not (Path(store) / "prob/c/0").exists()
    assert m["rows"] == 4 and m["by_status"] == {"OK": 3, "CORRUPT": 1}
    assert markers[2]["rows"] == 2  # the short last unit


def test_verify_finds_a_missing_a_truncated_and_a_corrupted_shard_and_repair_marks_them(
    tmp_path, capsys
):
    store = make_store(str(tmp_path / "s.zarr"))
    for deep in (False, True):
        r = verify_store(store, deep=deep)
        assert r.ok and r.units_checked == 3 and not r.unchecked, r.lines()
    assert main(["verify", store, "--deep"]) == 0
    assert "verified 3 units" in capsys.readouterr().out

    (Path(store) / "maps/c/1/0/0").unlink()  # unit 1: a shard deleted
    beta = Path(store) / "beta/c/2/0"  # unit 2: a chunk with one bit flipped, same size
    raw = bytearray(beta.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    beta.write_bytes(bytes(raw))
    fast = verify_store(store)
    assert sorted(fast.bad) == [1] and "maps/c/1/0/0 is missing" in fast.bad[1]
    deep = verify_store(store, deep=True)
    assert sorted(deep.bad) == [1, 2]
    assert "beta/c/2/0 has crc32c" in deep.bad[2]

    assert main(["verify", store]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "BAD unit 1: maps/c/1/0/0 is missing"
    assert main(["verify", store, "--deep", "--repair"]) == 1
    out = capsys.readouterr().out
    assert "removed the markers of 2 bad units (1-2)" in out
    assert done_units(store) == {0}  # exactly the bad units are pending now
    assert verify_store(store, deep=True).ok  # what is left is whole


def test_deep_verify_checks_rows_against_the_marker_and_truncation_is_found_fast(tmp_path):
    store = make_store(str(tmp_path / "s.zarr"))
    # The status chunk of unit 0 replaced by unit 1's (all OK): sizes differ -> fast;
    # with the marker's size patched too, only the row counts betray it -> deep.
    src, dst = Path(store) / "status/c/1", Path(store) / "status/c/0"
    dst.write_bytes(src.read_bytes())
    mk = Path(store) / marker_key(0) / "zarr.json"
    body = json.loads(mk.read_text())
    entry = body["attributes"]["objects"]["status/c/0"]
    size_differs = entry["size"] != src.stat().st_size
    entry.update(size=src.stat().st_size, crc32c=checksum(src.read_bytes()))
    mk.write_text(json.dumps(body))
    assert verify_store(store).ok or size_differs
    deep = verify_store(store, deep=True)
    assert sorted(deep.bad) == [0]
    assert "status counts OK=4 differ from its marker's CORRUPT=1,OK=3" in deep.bad[0]

    tr = Path(store) / "maps/c/2/0/0"
    tr.write_bytes(tr.read_bytes()[:-5])  # a truncated shard (a failed sync)
    assert "has" in verify_store(store).bad[2] and "bytes" in verify_store(store).bad[2]


def test_old_markers_without_checksums_are_reported_unchecked_not_bad(tmp_path, capsys):
    store = make_store(str(tmp_path / "s.zarr"))
    mk = Path(store) / marker_key(1) / "zarr.json"
    body = json.loads(mk.read_text())
    for k in ("objects", "empty", "checksum"):
        body["attributes"].pop(k)
    mk.write_text(json.dumps(body))
    r = verify_store(store, deep=True)
    assert r.ok and r.unchecked == [1]
    assert main(["verify", store]) == 0
    assert "1 units have no checksums recorded" in capsys.readouterr().out


def test_verify_and_repair_on_s3(tmp_path):
    pytest.importorskip("moto")
    from s3server import S3Server

    with S3Server() as s3:
        so = s3.storage_options
        store = make_store(f"{s3.make_bucket()}/out/s.zarr", storage_options=so)
        assert verify_store(store, so, deep=True).ok
        fs = s3.filesystem()
        fs.rm_file(f"{store}/maps/c/2/0/0")
        r = verify_store(store, so)
        assert sorted(r.bad) == [2] and "missing" in r.bad[2]
        verify_store(store, so, repair=True)
        assert done_units(store, so) == {0, 1}


# ---------------------------------------------------------------------------------------
# the lease
def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(store: str, **lease) -> None:
    path = Path(store) / LEASE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                "attributes": {"lease": {"token": "t", **lease}}}))  # fmt: skip


def test_a_second_driver_is_refused_while_the_first_holds_the_lease(tmp_path, capsys):
    store = make_store(str(tmp_path / "s.zarr"))
    first = StoreLease(store, heartbeat_s=0.2)
    first.acquire()
    try:
        beat0 = read_lease(store)["heartbeat"]
        with pytest.raises(LeaseHeldError) as e:
            StoreLease(store).acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"driver pid {os.getpid()} on {socket.gethostname()}" in msg
        time.sleep(0.6)
        assert read_lease(store)["heartbeat"] > beat0  # renewed by the heartbeat thread
        assert main(["status", store]) == 0
        assert f"driver lease: driver pid {os.getpid()}" in capsys.readouterr().out
    finally:
        first.release()
    assert read_lease(store) is None and not (Path(store) / LEASE).exists()
    second = StoreLease(store, heartbeat_s=0)
    second.acquire()  # free again
    second.release()
    main(["status", store])
    assert "driver lease: free" in capsys.readouterr().out


def test_a_dead_holder_is_taken_over_at_once_on_this_host_after_the_timeout_elsewhere(
    tmp_path, caplog
):
    store = make_store(str(tmp_path / "s.zarr"))
    host = socket.gethostname()
    # Same host, process gone (kill -9): at once, whatever the heartbeat's age.
    _plant(store, host=host, pid=_dead_pid(), heartbeat=time.time())
    lease = StoreLease(store, heartbeat_s=0)
    lease.acquire()
    assert lease.took_over and "its process is gone" in lease.took_over
    assert "taking over the lease" in caplog.text
    lease.release()
    # Same host, process alive (this one, another holder's token): never taken over.
    _plant(store, host=host, pid=os.getpid(), heartbeat=time.time() - 10_000)
    with pytest.raises(LeaseHeldError):
        StoreLease(store, heartbeat_s=0, timeout_s=1).acquire()
    # Another host: alive until its heartbeat is older than the timeout.
    _plant(store, host="elsewhere", pid=1, heartbeat=time.time() - 30)
    with pytest.raises(LeaseHeldError, match="pid 1 on elsewhere"):
        StoreLease(store, heartbeat_s=0, timeout_s=60).acquire()
    lease = StoreLease(store, heartbeat_s=0, timeout_s=20)
    lease.acquire()
    assert "heartbeat is 30 s old (timeout 20 s)" in lease.took_over
    lease.release()


def test_a_driver_whose_lease_was_taken_over_finds_out_at_its_next_heartbeat(tmp_path):
    store = make_store(str(tmp_path / "s.zarr"))
    lost: list[str] = []
    first = StoreLease(store, heartbeat_s=0.2, on_lost=lost.append)
    first.acquire()
    _plant(store, host="elsewhere", pid=1, heartbeat=time.time())  # what a takeover writes
    deadline = time.time() + 5
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    assert lost and "lost its lease to driver pid 1 on elsewhere" in lost[0]
    first.release()
    assert read_lease(store)["host"] == "elsewhere"  # the new holder's lease is left alone


def test_lease_on_s3_uses_conditional_writes(tmp_path):
    pytest.importorskip("moto")
    from s3server import S3Server

    with S3Server() as s3:
        so = s3.storage_options
        store = f"{s3.make_bucket()}/s.zarr"
        first = StoreLease(store, so, heartbeat_s=0)
        first.acquire()
        assert first._backend.conditional
        with pytest.raises(LeaseHeldError, match=f"driver pid {os.getpid()}"):
            StoreLease(store, so, heartbeat_s=0).acquire()
        # A stale ETag loses: the replace is refused by the server (If-Match).
        assert not first._backend.replace(b"{}", '"0123456789abcdef"')
        assert read_lease(store, so)["token"] == first.token
        first.release()
        assert read_lease(store, so) is None
        # Eight drivers at once on the free lease: If-None-Match lets exactly one in.
        import threading

        leases = [StoreLease(store, so, heartbeat_s=0) for _ in range(8)]
        won, start = [], threading.Barrier(8)

        def go(lease: StoreLease) -> None:
            start.wait()
            try:
                lease.acquire()
                won.append(lease)
            except LeaseHeldError:
                pass

        threads = [threading.Thread(target=go, args=(x,)) for x in leases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(won) == 1 and read_lease(store, so)["token"] == won[0].token
        won[0].release()


def test_verify_has_help_and_starts_without_torch(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify", "--help"])
    assert e.value.code == 0 and "--repair" in capsys.readouterr().out
    store = make_store(str(tmp_path / "s.zarr"))
    code = (
        "import sys\nfrom pipeline import cli\n"
        f"rc = cli.main(['verify', {store!r}, '--deep'])\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stdout + out.stderr
    assert main(["verify", str(tmp_path / "nothing.zarr")]) == 2  # one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no unioncam store at" in err[0], err


@pytest.mark.parametrize("stale", [False, True], ids=["free", "dead-holder"])
def test_drivers_racing_for_one_lease_exactly_one_wins(tmp_path, stale):
    """Eight drivers at once, on a free lease (exclusive create) and on a dead holder's
    (conditional replace, then a re-read): exactly one holds it, the others are refused."""
    import threading

    store = make_store(str(tmp_path / "s.zarr"))
    if stale:
        _plant(store, host=socket.gethostname(), pid=_dead_pid(), heartbeat=time.time())
    leases = [StoreLease(store, heartbeat_s=0) for _ in range(8)]
    won: list[StoreLease] = []
    refused: list[str] = []
    start = threading.Barrier(len(leases))

    def go(lease: StoreLease) -> None:
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeldError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1 and len(refused) == 7, (len(won), refused)
    assert read_lease(store)["token"] == won[0].token
    won[0].release()
