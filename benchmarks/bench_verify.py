"""Time ``unioncam verify`` (fast and deep) on a synthetic store of many units.

The store is written unit by unit with :func:`pipeline.store.units.write_unit`, as workers
write it (random maps, every row OK), so markers, shards and chunks are the real thing;
only the maps are small (``--image-size``, default 32) to keep building it quick. Fast mode
costs per object (one ``stat`` locally, one listing entry on S3), deep mode per byte.

    python benchmarks/bench_verify.py --units 1000 --out benchmarks/results/bench_verify_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import numpy as np

from pipeline.data.decode import Status
from pipeline.store.io import create_store, read_layout
from pipeline.store.layout import StoreLayout
from pipeline.store.units import write_unit
from pipeline.store.verify import verify_store


def build(path: str, units: int, unit_size: int, size: int) -> StoreLayout:
    pool = ("gradient:denoised", "region:groupcam", "fused:denoised+groupcam")
    rows = units * unit_size
    create_store(path, StoreLayout(num_rows=rows, unit_size=unit_size, image_size=size, pool=pool))
    layout = StoreLayout(num_rows=rows, unit_size=unit_size, image_size=(size, size), pool=pool)
    rng = np.random.default_rng(0)
    for u in range(units):
        a = layout.empty_rows(unit_size)
        a["status"][:] = int(Status.OK)
        a["maps"][:] = rng.random((unit_size, size, size))
        for name in ("beta", "selection_score"):
            a[name][:] = rng.random((unit_size, len(pool)))
        a["selected"][:] = rng.integers(0, len(pool), unit_size)
        for name in ("target", "label", "predicted"):
            a[name][:] = rng.integers(0, 1000, unit_size)
        for name in ("prob", "baseline_prob"):
            a[name][:] = rng.random(unit_size)
        a["orig_size"][:] = 375
        a["crop_box"][:] = 16
        write_unit(path, read_layout(path), u, a)
    return layout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units", type=int, default=1000)
    p.add_argument("--unit-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", help="write a Markdown table here")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-verify-")
    path = os.path.join(tmp, "store.zarr")
    try:
        t0 = time.perf_counter()
        build(path, a.units, a.unit_size, a.image_size)
        build_s = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        rows = []
        for deep in (False, True):
            times = []
            for _ in range(a.repeat):
                r = verify_store(path, deep=deep)
                assert r.ok, r.lines()
                times.append(r.seconds)
            rows.append((deep, r.units_checked, r.objects_checked, r.bytes_read, min(times)))
        lines = [
            f"# verify on a local store of {a.units} units ({a.unit_size} rows of "
            f"{a.image_size}x{a.image_size} maps each, {size / 1e6:.1f} MB; built in "
            f"{build_s:.0f} s)",
            "",
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
            f"Python {platform.python_version()}; best of {a.repeat}.",
            "",
            "| mode | units | objects | bytes read | seconds |",
            "|---|---:|---:|---:|---:|",
        ]
        for deep, units, objects, read, secs in rows:
            lines.append(
                f"| {'deep' if deep else 'fast'} | {units} | {objects} | "
                f"{read / 1e6:.1f} MB | {secs:.2f} |"
            )
        text = "\n".join(lines)
        print(text)
        if a.out:
            with open(a.out, "w") as fh:
                fh.write(text + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
