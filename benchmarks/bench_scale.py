"""ImageNet at full size, rehearsed: every stage of the pipeline at ImageNet train's row count.

Not a test: prints Markdown tables (and writes them with a JSON twin under ``--out``).

What it runs, and why: the mission is a whole ImageNet (1,281,167 rows, 1,252 units of
1,024) on a cluster, so this drives the real command line over that many rows on this
machine, as a user would, with the ``null`` explainer (no decoding, no model: what is left
is the pipeline's own cost) writing CAM-like maps (smooth blobs: zeros compress to nothing
and would hide what a real map costs the store):

1. ``unioncam manifest`` of a CSV list of ``--rows`` rows (class ``i mod 1000``);
2. ``unioncam run --explainer null --image-size S --cpu`` (``--actors`` actors);
3. ``status``, ``query top``, ``query row``, ``export --csv``, ``verify``,
   ``verify --deep``, ``analyze``, ``atlas``.

For each stage: wall time, rows/s, the peak RSS of the command's own process (VmHWM,
sampled from /proc; Ray's actors are separate processes and are reported by the run's
markers instead), and the store's bytes on disk after it. Then **the unit write** side by
side: one 1,024-row unit of CAM-like maps written by :class:`pipeline.store.units.UnitWriter`
at 56 and 224 px, with format 3's map layout (one-row inner chunks, zstd level 5) and
today's (``map_chunk`` rows per inner chunk, zstd level 1), interleaved rounds, best of
each: the process's CPU seconds (Blosc compresses in zarr's threads), wall seconds, the
whole-unit read back, and one row read. Last, the projection for ImageNet train on 8 GPU
nodes from the measured per-unit costs.

Usage::

    python benchmarks/bench_scale.py                              # 1,281,167 rows at 56 px
    python benchmarks/bench_scale.py --rows 102400 --skip-write   # a quick look

Do not run it while tests run: both compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import loadavg, machine_line  # noqa: E402

IMAGENET_TRAIN_ROWS = 1_281_167
UNIT = 1024


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table as text (the report is written to a file as well as printed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def du(path: Path) -> int:
    """Bytes on disk of every file under ``path``."""
    total = 0
    for dp, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dp, f))
            except OSError:
                pass
    return total


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def stage(name: str, args: list[str], rows: int, store: Path | None, log: Path) -> dict:
    """Run one ``unioncam`` command; its wall time, rows/s, peak RSS and the store's bytes."""
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        fh.write(f"\n$ unioncam {' '.join(args)}\n".encode())
        fh.flush()
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak = [0]
        rss_trace: list[int] = []

        def sample() -> None:
            while p.poll() is None:
                peak[0] = max(peak[0], _hwm_kb(p.pid))
                try:
                    rss = Path(f"/proc/{p.pid}/statm").read_text().split()[1]
                    rss_trace.append(int(rss) * os.sysconf("SC_PAGE_SIZE") // 1024)
                except OSError:
                    pass
                time.sleep(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = p.wait()
        th.join()
    wall = time.perf_counter() - t0
    out = {"stage": name, "rc": rc, "wall_s": round(wall, 2),
           "rows_per_s": round(rows / wall, 1) if rows else None,
           "peak_rss_mb": round(peak[0] / 1024, 1),
           "store_mb": round(du(store) / 2**20, 1) if store and store.exists() else None}  # fmt: skip
    if len(rss_trace) >= 8:  # flat memory: the last quarter's mean against the second's
        q = len(rss_trace) // 4
        out["rss_mb_q2_q4"] = [round(float(np.mean(rss_trace[q:2 * q])) / 1024, 1),
                               round(float(np.mean(rss_trace[3 * q:])) / 1024, 1)]  # fmt: skip
    print(f"  {name}: rc {rc}, {wall:.1f} s, peak RSS {out['peak_rss_mb']} MB "
          f"(load {loadavg()})", flush=True)  # fmt: skip
    if rc != 0:
        raise SystemExit(f"stage {name} failed (rc {rc}); see {log}")
    return out


def write_list(path: Path, rows: int) -> None:
    with open(path, "w") as fh:
        fh.write("uri,label\n")
        for start in range(0, rows, 100_000):
            stop = min(rows, start + 100_000)
            fh.write("".join(f"/nonexistent/train/c{i % 1000:04d}/img_{i:08d}.JPEG,{i % 1000}\n"
                             for i in range(start, stop)))  # fmt: skip


# ---------------------------------------------------------------------------------------
# the unit write, side by side
def unit_write(sides: tuple[int, ...], rounds: int, tmp: Path) -> list[dict]:
    """Format 3's map layout against today's, interleaved, best of ``rounds`` each."""
    from pipeline.run.rows import null_maps
    from pipeline.store.io import create_store, open_store
    from pipeline.store.layout import StoreLayout
    from pipeline.store.units import UnitWriter

    variants = {"format 3 (1-row chunks, zstd:5)": {"map_chunk": 1, "map_codec": "zstd:5"},
                "today (default)": {}}  # fmt: skip
    results: list[dict] = []
    pool = ("gradient:denoised", "region:groupcam", "fused:denoised+groupcam")
    for side in sides:
        maps = null_maps(0, UNIT, (side, side)).astype(np.float32)
        best: dict[str, dict] = {}
        for r in range(rounds):
            for label, kw in variants.items():
                path = tmp / f"w{side}-{r}-{len(best)}.zarr"
                layout = StoreLayout(num_rows=4 * UNIT, unit_size=UNIT, image_size=side,
                                     pool=pool, **kw)  # fmt: skip
                create_store(path, layout)
                writer = UnitWriter(path, layout)
                arrays = layout.empty_rows(UNIT)
                arrays["maps"], arrays["status"] = maps, np.zeros(UNIT, np.uint8)
                c0, t0 = time.process_time(), time.perf_counter()
                writer.write(1, arrays)
                cw, ww = time.process_time() - c0, time.perf_counter() - t0
                g = open_store(path)
                c0, t0 = time.process_time(), time.perf_counter()
                back = np.asarray(g["maps"][UNIT:2 * UNIT])
                cr, wr = time.process_time() - c0, time.perf_counter() - t0
                t0 = time.perf_counter()
                one = np.asarray(g["maps"][UNIT + 517])
                w1 = time.perf_counter() - t0
                err = float(np.abs(back.astype(np.float32) - maps.astype(np.float16)).max())
                row = {"side": side, "layout": label, "write_cpu_s": cw, "write_wall_s": ww,
                       "read_cpu_s": cr, "read_wall_s": wr, "row_ms": w1 * 1e3,
                       "map_mb": du(path / "maps") / 2**20, "max_abs_err": err,
                       "map_chunk": layout.map_chunk}  # fmt: skip
                assert one.shape == (side, side)
                old = best.get(label)
                if old is None or cw < old["write_cpu_s"]:
                    best[label] = row
                shutil.rmtree(path)
        results += list(best.values())
    return results


def projection(stages: dict[str, dict], writes: list[dict], rows: int, side: int) -> list[dict]:
    """ImageNet train on 8 GPU nodes from the per-row and per-unit costs measured here."""
    units = -(-IMAGENET_TRAIN_ROWS // UNIT)
    scale = IMAGENET_TRAIN_ROWS / rows
    out = []
    today = {w["side"]: w for w in writes if w["layout"] == "today (default)"}
    for s, w in sorted(today.items()):
        out.append({"what": f"store writes at {s} px (CPU, all units)",
                    "one node": f"{units * w['write_cpu_s'] / 60:.1f} core-min",
                    "8 nodes": f"{units * w['write_cpu_s'] / 8 / 60:.2f} core-min per node",
                    "against": "default preset at 44 img/s/GPU: 23 s per unit"})  # fmt: skip
    for key in ("run", "verify --deep", "analyze"):
        if key in stages:
            t = stages[key]["wall_s"] * scale
            per = t / 8 if key != "run" else t / 8
            out.append({"what": f"{key} at {side} px (this machine's 2 cores)",
                        "one node": f"{t / 60:.1f} min", "8 nodes": f"{per / 60:.1f} min"
                        + (" (as Ray tasks)" if key == "analyze" else ""),
                        "against": "ImageNet train in 10 min on 8 GPUs (Grad-CAM goal)"})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=IMAGENET_TRAIN_ROWS)
    ap.add_argument("--map-size", type=int, default=56, help="side of the null run's maps")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the unit-write table")
    ap.add_argument("--skip-write", action="store_true", help="no unit-write table")
    ap.add_argument("--skip-stages", action="store_true", help="only the unit-write table")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_scale"))
    ap.add_argument("--work", help="folder for the list, manifest and store (default: a tmp)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    print(f"# bench_scale: {a.rows:,} rows, {a.map_size}-px maps, {a.actors} actors; "
          f"work in {work}\n{machine_line('cpu')}; load {loadavg()}", flush=True)  # fmt: skip
    stages: dict[str, dict] = {}
    if not a.skip_stages:
        lst, man, store = work / "list.csv", work / "manifest.parquet", work / "store.zarr"
        write_list(lst, a.rows)
        for p in (man, store, work / "atlas", work / "rows.csv"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        s = str(store)
        plan = [
            ("manifest", ["manifest", str(lst), str(man)], None),
            ("run", ["run", str(man), s, "--explainer", "null", "--image-size",
                     str(a.map_size), "--cpu", "--actors", str(a.actors), "--no-progress",
                     "--no-dashboard", "--no-ray-metrics"], store),
            ("status", ["status", s], store),
            ("query top", ["query", s, "top", "--by", "prob", "-k", "10"], store),
            ("query row", ["query", s, "row", str(a.rows // 2)], store),
            ("export --csv", ["export", s, "--csv", str(work / "rows.csv")], store),
            ("verify", ["verify", s], store),
            ("verify --deep", ["verify", s, "--deep"], store),
            ("analyze", ["analyze", s, "--groups", "class"], store),
            ("atlas", ["atlas", s, "--out", str(work / "atlas")], store),
        ]  # fmt: skip
        for name, args, st in plan:
            stages[name] = stage(name, args, a.rows if name not in ("query row",) else 1,
                                 st, log)  # fmt: skip
        markers = json.loads(subprocess.run(
            [sys.executable, "-c", "import json,sys; from pipeline.store.units import read_markers;"
             f"m=read_markers({s!r}); print(json.dumps([v.get('write_seconds') for v in m.values()]))"],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True).stdout)  # fmt: skip
        ws = np.asarray([w for w in markers if w is not None], float)
        stages["run"]["write_s_per_unit"] = {"median": round(float(np.median(ws)), 3),
                                             "p90": round(float(np.percentile(ws, 90)), 3),
                                             "units": int(ws.size)}  # fmt: skip
    writes = [] if a.skip_write else unit_write((56, 224), a.rounds, work)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = [f"# Scale rehearsal: {a.rows:,} rows ({-(-a.rows // UNIT):,} units of {UNIT}), "
            f"null explainer, {a.map_size}-px CAM-like maps, {a.actors} actors",
            "", f"Machine: {machine_line('cpu')}. Load at the end: {loadavg()}.", ""]  # fmt: skip
    if stages:
        text += ["## Every stage", "", md_table(
            ["stage", "wall s", "rows/s", "peak RSS MB", "store MB"],
            [[k, v["wall_s"], v["rows_per_s"] if v["rows_per_s"] else "",
              v["peak_rss_mb"], v["store_mb"] if v["store_mb"] is not None else ""]
             for k, v in stages.items()]), ""]  # fmt: skip
        w = stages["run"]["write_s_per_unit"]
        text += [f"Markers' `write_seconds` per unit (wall, while the other actor ran): median "
                 f"{w['median']} s, p90 {w['p90']} s over {w['units']} units. Driver RSS in the "
                 f"run's second and last quarter: {stages['run'].get('rss_mb_q2_q4')} MB.", ""]  # fmt: skip
    if writes:
        text += ["## One 1,024-row unit written, format 3 against today (best of "
                 f"{a.rounds} interleaved rounds)", "", md_table(
                     ["side", "layout", "rows/chunk", "write CPU s", "write wall s",
                      "read CPU s", "row ms", "maps MB", "max abs err"],
                     [[w["side"], w["layout"], w["map_chunk"], f"{w['write_cpu_s']:.3f}",
                       f"{w['write_wall_s']:.3f}", f"{w['read_cpu_s']:.3f}", f"{w['row_ms']:.1f}",
                       f"{w['map_mb']:.2f}", f"{w['max_abs_err']:.1e}"] for w in writes]), ""]  # fmt: skip
        if stages:
            text += ["## Projection: ImageNet train (1,281,167 rows) on 8 GPU nodes", "",
                     md_table(["what", "one node", "8 nodes", "against"],
                              [list(r.values()) for r in projection(stages, writes, a.rows,
                                                                    a.map_size)]), ""]  # fmt: skip
    report = "\n".join(text)
    print("\n" + report)
    out.with_suffix(".md").write_text(report + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"rows": a.rows, "map_size": a.map_size,
                                                    "stages": stages, "unit_write": writes},
                                                   indent=1), encoding="utf-8")  # fmt: skip


if __name__ == "__main__":
    main()
