"""``benchmarks/rival_study.py`` runs end to end on one photo at a cheap layer: the six maps,
both metric families, the cache it resumes from and the paired table it publishes.

One photo makes every bootstrap CI a single point, so the verdict of each pair must follow
the sign of its difference exactly; that, and a second run computing nothing, can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "rival_study.py"


@pytest.mark.imagenet
@pytest.mark.slow
def test_rival_study_smoke(imagenet_dir: Path, tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = [sys.executable, str(SCRIPT), "--layers", "_blocks.3:1", "--cache", str(cache),
            "--out", str(out)]
    first = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert first.returncode == 0, first.stderr[-2000:]
    (cached,) = (cache / "_blocks.3").glob("*.json")
    res = json.loads((out / "rival_study.json").read_text())["layers"]["_blocks.3"]
    assert res["n"] == 1 and set(res["mean"]) == {"unioncam", "unioncam:paper", "fusioncam",
                                                  "ablationcam", "scorecam", "gradcam"}
    for m, s in res["mean"].items():
        assert s["insdel"] == pytest.approx(s["ins"] - s["del"]), m
        assert s["road"] == pytest.approx((s["lerf"] - s["morf"]) / 2), m
    for m, fams in res["default_minus"].items():
        for fam, d in fams.items():
            want = (res["mean"]["unioncam"][fam] - res["mean"][m][fam])
            assert d["mean"] == pytest.approx(want) and d["low"] == pytest.approx(want)
            assert d["verdict"] == ("default better" if want > 0 else f"{m} better"
                                    if want < 0 else "tie"), (m, fam)
    assert "| `fusioncam` |" in (out / "rival_study.md").read_text()
    # resumable: a second run reads the cache and computes nothing
    stamp = cached.stat().st_mtime_ns
    again = subprocess.run(args + ["--no-compute"], capture_output=True, text=True, timeout=300,
                           cwd=REPO)
    assert again.returncode == 0, again.stderr[-2000:]
    assert cached.stat().st_mtime_ns == stamp
    assert json.loads((out / "rival_study.json").read_text())["layers"]["_blocks.3"] == res
