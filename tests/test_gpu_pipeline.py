"""``benchmarks/gpu_pipeline.sh`` runs end to end: in its CPU smoke mode here, so the one
prepared script a GPU session runs cannot rot between the sessions that are lent a GPU."""

from __future__ import annotations

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
         "--configs", "unioncam:fast:fp32,gradcam::fp32"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHON": sys.executable, "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((out / "gpu_pipeline.json").read_text())
    assert [r["config"] for r in res["rows"]] == ["unioncam fast fp32", "gradcam fp32"]
    for r in res["rows"]:
        assert r["images_ok"] == 8, r
        assert r["images_per_s_explaining"] > 0 and r["library_images_per_s"] > 0, r
        assert r["ratio_pipeline_to_library"] > 0 and r["decode_threads_to_feed"] > 0, r
        assert r["imagenet_train_hours_8_gpus"] > 0 and r["write_ms_per_unit"] > 0, r
    assert res["decode_ms_per_image"] > 0
    md = (out / "gpu_pipeline.md").read_text()
    assert "| gradcam fp32 |" in md and "CPU smoke mode" in md
    # Grad-CAM is one forward and one backward: faster than UnionCAM's 38 forwards.
    rows = {r["config"]: r for r in res["rows"]}
    assert rows["gradcam fp32"]["library_images_per_s"] > rows["unioncam fast fp32"][
        "library_images_per_s"]
