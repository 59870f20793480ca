"""``benchmarks/gpu_pipeline.sh`` runs end to end: in its CPU smoke mode here, so the one
prepared script a GPU session runs cannot rot between the sessions that are lent a GPU.

With a prepared ``.whl/`` (``bash benchmarks/gpu_pipeline.sh prepare``; never downloaded
here) it also runs the carry check and installs those wheels into a throwaway target, as
the device does, for the device's Python 3.12 (pip's cross-install flags: the files are
unpacked and laid out, their imports are not run, since this machine's Python is 3.11)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

#: The slow end-to-end tier (`python -m pytest -m slow`; .ci/run runs it).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_gpu_pipeline_script_runs_end_to_end_in_cpu_smoke_mode(tmp_path: Path) -> None:
    out = tmp_path / "gp"
    p = subprocess.run(
        ["bash", "benchmarks/gpu_pipeline.sh", "--cpu", "--images", "8", "--out", str(out),
         "--configs", "unioncam:fast:fp32,gradcam::fp32", "--photos", "skimage",
         "--batches", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHON": sys.executable, "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    # The device returns at most 8 files; the script writes 5, the GPU's line first.
    assert sorted(f.name for f in out.iterdir()) == [
        "cuda_tests.log", "gpu.txt", "gpu_pipeline.json", "gpu_pipeline.log", "gpu_pipeline.md"]
    gpu_txt = (out / "gpu.txt").read_text()
    assert "no nvidia-smi" in gpu_txt or "CUDA" in gpu_txt
    assert "cuda tests exit code 0" in gpu_txt and "gpu_pipeline.py exit code 0" in gpu_txt
    assert "skipped" in (out / "cuda_tests.log").read_text()  # collected, skipped on a CPU
    res = json.loads((out / "gpu_pipeline.json").read_text())
    assert [r["config"] for r in res["rows"]] == ["unioncam fast fp32", "gradcam fp32"]
    for r in res["rows"]:
        assert r["images_ok"] == 8, r
        assert r["images_per_s_explaining"] > 0 and r["library_images_per_s"] > 0, r
        assert r["ratio_pipeline_to_library"] > 0 and r["decode_threads_to_feed"] > 0, r
        assert r["imagenet_train_hours_8_gpus"] > 0 and r["write_ms_per_unit"] > 0, r
    assert res["decode_ms_per_image"] > 0 and res["skipped"] == []
    lib = {(r["method"], r["batch"]): r for r in res["library"]}
    # paper at a quarter of the batch, the default preset at the sweep's batch, each one's own.
    assert set(lib) == {("unioncam paper", 1), ("unioncam faithful", 2), ("unioncam fast", 4),
                        ("gradcam", 4)}  # fmt: skip
    assert lib[("unioncam faithful", 2)]["forwards_vs_paper"] > 0
    assert all(r["forwards_per_s"] > 0 for r in res["library"])
    md = (out / "gpu_pipeline.md").read_text()
    assert "| gradcam fp32 |" in md and "CPU smoke mode" in md
    # Grad-CAM is one forward and one backward: faster than UnionCAM's 38 forwards.
    rows = {r["config"]: r for r in res["rows"]}
    assert rows["gradcam fp32"]["library_images_per_s"] > rows["unioncam fast fp32"][
        "library_images_per_s"]


WHL = REPO / ".whl"


@pytest.mark.skipif(not list(WHL.glob("*.whl")), reason="no .whl/: `bash benchmarks/"
                    "gpu_pipeline.sh prepare` makes it (a download; tests stay offline)")  # fmt: skip
def test_prepared_carry_fits_and_installs_into_a_throwaway_target(tmp_path: Path) -> None:
    check = subprocess.run([sys.executable, "benchmarks/gpu_carry.py", "check", str(WHL)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "MiB per device command (limit 60 MiB)" in check.stdout
    target = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--no-cache-dir", "--target", str(target), "--python-version", "3.12",
         "--implementation", "cp", "--only-binary=:all:", "--ignore-requires-python",
         *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                       "manylinux2014_x86_64")],
         *map(str, sorted(WHL.glob("*.whl")))],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stdout + pip.stderr
    # Every file each installed RECORD names is there; Ray's servers kept their exec bits.
    records = list(target.glob("*.dist-info/RECORD"))
    assert {r.parent.name.split("-")[0] for r in records} >= {"ray", "zarr", "numcodecs"}
    for rec in records:
        for row in csv.reader(rec.read_text().splitlines()):
            if row and not row[0].startswith(".."):
                assert (target / row[0]).exists(), (rec, row[0])
    for exe in ("ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet"):
        assert os.access(target / exe, os.X_OK), exe
    assert not (target / "ray" / "jars").exists()
