"""Benchmark of ``unioncam analyze`` at dataset scale (not a test: prints a Markdown table).

What it measures, and why: the analysis must run over ImageNet-train (1.28 M rows) in
bounded memory, so this writes a synthetic store of ``--rows`` rows (default 200,000,
56-px maps like a ResNet/EfficientNet layer-4 map upsampled to 56, 1,000 classes of 200
rows; one class in ten has a planted minority strategy: 20 % of its maps look at a
corner) through the store's own API, then runs the whole analysis in a child process and
reports:

* rows/s of each step (describe: read every map, descriptors, thumbnails, write back;
  tables: per-class sums, sampling, clustering, assignment) and of the whole;
* the child's peak RSS (``ru_maxrss``): what bounded memory means in practice;
* whether the planted classes came out on top of the Clever-Hans ranking;
* the projection to ImageNet-train at the stored map size: describe and the row passes
  scale with rows; clustering with groups x min(rows per group, 500)^~2, measured here
  on a 500-row group.

Usage::

    python benchmarks/bench_analysis.py                    # 200,000 rows (a few minutes)
    python benchmarks/bench_analysis.py --rows 20000       # a quick look

Do not run it while the test suite runs: both compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMAGENET_TRAIN_ROWS = 1_281_167


def write_store(path: Path, rows: int, side: int, unit: int, classes: int) -> dict:
    """The synthetic store; returns the planted classes and the seconds it took."""
    from pipeline.store.io import create_store, read_layout
    from pipeline.store.layout import StoreLayout
    from pipeline.store.units import write_unit

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    create_store(path, StoreLayout(num_rows=rows, unit_size=unit, image_size=side, pool=("gradient:denoised", "region:groupcam")), attrs={"manifest_fingerprint": "bench", "config_fingerprint": "bench"})  # fmt: skip
    target = np.arange(rows) % classes
    planted = set(range(0, classes, 10))
    yy = ((np.arange(side) + 0.5) / side)[None, :, None]
    xx = ((np.arange(side) + 0.5) / side)[None, None, :]
    for u in range(-(-rows // unit)):
        s, e = u * unit, min(rows, (u + 1) * unit)
        n = e - s
        t = target[s:e]
        corner = np.isin(t, list(planted)) & (rng.random(n) < 0.2)
        cy = np.where(corner, 0.1, 0.5) + rng.normal(0, 0.04, n)
        cx = np.where(corner, 0.9, 0.5) + rng.normal(0, 0.04, n)
        sd = np.where(corner, 0.07, 0.15) * rng.uniform(0.8, 1.2, n)
        m = np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2)
                   / (2 * sd[:, None, None] ** 2)).astype(np.float32)  # fmt: skip
        m += rng.uniform(0, 0.15, m.shape).astype(np.float32)
        m -= m.min((1, 2), keepdims=True)
        m /= m.max((1, 2), keepdims=True)
        write_unit(path, read_layout(path), u, {"maps": m.astype(np.float16), "status": np.zeros(n, np.uint8),
                             "target": t.astype(np.int32), "label": t.astype(np.int32)})  # fmt: skip
    return {"planted": sorted(planted), "seconds": time.perf_counter() - t0}


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from pipeline.analysis.store_analysis import AnalysisConfig, analyze
from pipeline.analysis.reader import open_reader
t0 = time.perf_counter()
s = analyze({store!r}, config=AnalysisConfig(groups="class"), parallel=False)
wall = time.perf_counter() - t0
ranking = open_reader({store!r}).analysis().clever_hans_ranking()
print(json.dumps({{"wall": wall, "timings": s.timings, "rows": s.rows_described,
                  "groups": s.groups, "ranking": ranking[:150],
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def cluster_seconds(n: int, side: int = 16, repeat: int = 3) -> float:
    """Seconds to find the strategies of one group of ``n`` rows (two planted patterns)."""
    from pipeline.analysis.descriptors import thumbnails
    from pipeline.analysis.strategies import find_strategies

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:56, 0:56] / 56
    maps = []
    for i in range(n):
        cy, cx, s = (0.1, 0.9, 0.07) if i % 5 == 0 else (0.5, 0.5, 0.15)
        m = np.exp(-((yy - cy - rng.normal(0, .04)) ** 2 + (xx - cx - rng.normal(0, .04)) ** 2)
                   / (2 * s * s)) + rng.uniform(0, 0.15, (56, 56))  # fmt: skip
        maps.append(m / m.max())
    t = thumbnails(np.array(maps), side)
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        find_strategies(t)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--side", type=int, default=56)
    p.add_argument("--unit-size", type=int, default=1024)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dir", help="where to write the store (default: a temporary folder)")
    a = p.parse_args()
    tmp = Path(a.dir or tempfile.mkdtemp(prefix="bench-analysis-"))
    store = tmp / "store.zarr"
    if store.exists():
        shutil.rmtree(store)
    made = write_store(store, a.rows, a.side, a.unit_size, a.classes)
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), store=str(store))],
                         capture_output=True, text=True, check=True)  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    analysis_size = sum(f.stat().st_size for f in (store / "analysis").rglob("*") if f.is_file())
    per_group = a.rows / a.classes
    c_here = cluster_seconds(int(min(per_group, 500)))
    c_500 = cluster_seconds(500)
    t = r["timings"]
    row_passes = t["tables"] - t["clustering"]
    scale = IMAGENET_TRAIN_ROWS / a.rows
    projected = t["describe"] * scale + row_passes * scale + 1000 * c_500
    planted = set(map(str, made["planted"]))
    top = [g for g, _ in r["ranking"][: len(planted)]]
    hit = len(planted & set(top)) / max(len(planted), 1)
    load = os.getloadavg()[0]
    lines = [
        f"## `unioncam analyze` on {a.rows:,} rows ({a.side}-px maps, {a.classes} classes)",
        "",
        f"machine: {os.cpu_count()} CPU cores, load average {load:.1f} at the end "
        "(shared: figures are upper bounds on time)",
        "",
        "| step | seconds | rows/s |",
        "|---|---:|---:|",
        f"| describe (read maps, descriptors, thumbnails, write) | {t['describe']:.1f} | "
        f"{a.rows / t['describe']:,.0f} |",
        f"| tables: row passes (sums, sample, assignment) | {row_passes:.1f} | "
        f"{a.rows / max(row_passes, 1e-9):,.0f} |",
        f"| tables: clustering ({r['groups']} groups of {per_group:.0f} rows) | "
        f"{t['clustering']:.1f} | {a.rows / max(t['clustering'], 1e-9):,.0f} |",
        f"| **whole analysis** | **{r['wall']:.1f}** | **{a.rows / r['wall']:,.0f}** |",
        "",
        f"peak RSS of the analysing process: {r['maxrss_kb'] / 1024:.0f} MiB; store "
        f"{size / 2**20:,.0f} MiB, of which the analysis group "
        f"{analysis_size / 2**20:,.0f} MiB; writing the synthetic store took "
        f"{made['seconds']:.0f} s.",
        "",
        f"planted Clever-Hans classes among the top {len(planted)} of the ranking: "
        f"{hit:.0%}.",
        "",
        f"one group's clustering: {c_here:.2f} s at {min(per_group, 500):.0f} rows, "
        f"{c_500:.2f} s at 500 rows (the sample cap).",
        "",
        f"**projection to ImageNet-train** ({IMAGENET_TRAIN_ROWS:,} rows, 1,000 classes, "
        f"same map size, one process): describe {t['describe'] * scale / 60:.0f} min + row "
        f"passes {row_passes * scale / 60:.0f} min + clustering 1,000 x {c_500:.2f} s = "
        f"{1000 * c_500 / 60:.0f} min; about {projected / 60:.0f} min in all. Describe "
        "parallelises over units as Ray tasks; memory stays bounded by 1,000 x 500 "
        "thumbnails of 256 float16 (250 MiB) plus one unit.",
    ]
    print("\n".join(lines))
    if not a.dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
