"""What the benchmarks share: where the sample photos are, the machine line, timing of
interleaved rounds, Markdown tables, photo loading.

Imported by ``bench_unioncam.py`` and ``bench_pipeline.py`` (run as scripts from any
folder: the script's own folder is on ``sys.path``). torch is imported when a helper needs it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Highest 1-min load average seen while running (for the results' warning).
PEAK_LOAD = [0.0]


# ---------------------------------------------------------------------------- machine / timing
def machine_line(device: Any = None) -> str:
    """CPU model, cores, torch version (and the GPU, when used): where a number came from."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = platform.processor() or "unknown CPU"
    flags = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        cpu = info.get("Model name", cpu).strip()
        have = set(info.get("Flags", "").split())
        flags = ", ".join(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in have) or "none"
    line = (f"{cpu}, {os.cpu_count()} logical cores (torch threads {torch.get_num_threads()}), "
            f"bf16 CPU flags: {flags}; torch {torch.__version__}, Python {platform.python_version()}")
    if device.type == "cuda":
        # PyTorch's default runs fp32 convolutions in TF32 on Ampere+; every method here
        # shares that setting, and the line says which it was.
        tf32 = "on" if torch.backends.cudnn.allow_tf32 else "off"
        line = (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, cuDNN TF32 "
                f"convolutions {tf32}); host: " + line)
    return line



def loadavg() -> str:
    """The 1/5/15-minute load averages; also tracks the peak for the results' warning."""
    try:
        vals = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return "n/a"
    PEAK_LOAD[0] = max(PEAK_LOAD[0], float(vals[0]))
    return " ".join(vals)


def sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> tuple[Any, float, float]:
    """Run ``fn`` once: (result, wall seconds, process CPU seconds)."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - w0, time.process_time() - c0


def interleaved(cands: dict[str, Callable[[], Any]], rounds: int, device: Any,
                log: Callable[[str], None], label: str) -> dict[str, dict[str, list]]:
    """Time every candidate once per round, rotating the order each round (A B C, B C A, ...)."""
    names = list(cands)
    rec: dict[str, dict[str, list]] = {k: {"wall": [], "cpu": [], "out": []} for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            out, wall, cpu = timed(cands[name], device)
            rec[name]["wall"].append(wall)
            rec[name]["cpu"].append(cpu)
            rec[name]["out"].append(out)
            log(f"  [{label} round {r + 1}/{rounds}] {name}: {wall:.2f} s wall, {cpu:.2f} s cpu"
                f"  (load {loadavg()})")
    return rec


def median_paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[r]/den[r]: robust to load changing between rounds."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))



def markdown_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """Print a Markdown table (floats to 3 significant digits) under a ``###`` title."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- inputs
def sample_rows(n: int, folder: Path = SAMPLE) -> list[tuple[str, int]]:
    """``n`` (path, class index) pairs of the sample photos (repeated when ``n`` is larger)."""
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = [(str(folder / r["file"]), int(r["class_index"])) for r in rows]
    while len(out) < n:  # reuse files if more images than the sample are asked for
        out += out[: n - len(out)]
    return out[:n]


def load_photos(loaded, n: int, size: int = 224, folder: Path = SAMPLE
                ) -> tuple[Any, list[str]]:
    """``n`` real ImageNet photos spread over the sample, preprocessed for ``loaded``."""
    import torch
    from PIL import Image

    if not (folder / "labels.csv").exists():
        raise SystemExit(f"--images: no labels.csv in {folder} (the ImageNet sample folder)")
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise SystemExit(f"--images: no photos listed in {folder / 'labels.csv'}")
    pre = loaded.preprocess.with_size(size)
    picks = [rows[round(i * (len(rows) - 1) / max(n - 1, 1))] for i in range(n)]
    xs = []
    for row in picks:
        with Image.open(folder / row["file"]) as img:
            xs.append(pre(img)[0])
    return torch.stack(xs), [r["file"] for r in picks]

