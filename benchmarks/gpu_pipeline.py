"""The pipeline on a GPU, end to end (issues 14, 24): read, decode, explain, write.

Not a test: one prepared run that prints tables and rewrites ``gpu_pipeline.{md,json}``
after every measurement (a time limit still returns what was measured). In order:

1. the library alone on pre-decoded tensors: the default preset at each batch size of
   ``--batches`` in forwards/s against ``paper``'s (goal >= 0.9), each precision, and
   every configured method at the pipeline's batch (for the ratio below);
2. decode ms/image on one CPU thread, and with ``torchvision.io.decode_jpeg`` on the GPU;
3. for each configuration (method, preset, precision), ``unioncam run`` on one actor over
   >= 2,000 JPEGs of ImageNet-like sizes and qualities (re-encoded from the ImageNet sample,
   or from scikit-image's photos when the sample is absent; ``paper`` on fewer, its
   Score-CAM costing a forward per channel): images/s while explaining and end to end, the
   library alone's rate and the ratio (goal >= 0.9), the GPU's busy share and its idle
   share while units are written, write ms/unit, decode threads needed to keep up, and the
   projected hours for ImageNet train (1,281,167 images) on 8 such GPUs.

``--cpu`` is a smoke mode for machines without a GPU (and for the test suite): 16 photos,
ResNet-18 at 64 px, the default preset and Grad-CAM; the numbers then say nothing about a
GPU, only that every step of the script runs.

Usage: ``bash benchmarks/gpu_pipeline.sh`` (see there for the device's wheels), or
``python benchmarks/gpu_pipeline.py --cpu --out /tmp/gp``.
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

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
from common import SAMPLE, machine_line  # noqa: E402
from common import markdown_table as table  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def make_photos(n: int, out: Path, seed: int = 0, source: str = "auto") -> list[tuple[str, int | None]]:
    """``n`` JPEGs re-encoded at varied sizes (long side 256-800 px) and qualities (70-95).

    ``source``: ``sample`` (the ImageNet sample beside the repo), ``skimage`` (what the GPU
    machine uses: the sample does not travel) or ``auto`` (the sample where it exists).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    if source == "sample" or (source == "auto" and (SAMPLE / "labels.csv").exists()):
        from common import sample_rows

        sources = [(Image.open(p).convert("RGB"), c) for p, c in sample_rows(min(n, 200))]
    else:  # a machine without the ImageNet sample: the photos scikit-image ships
        from skimage import data

        # Only those shipped inside the wheel: the others (cat, ...) are downloaded on first use,
        # and the GPU machine reaches no network.
        names = ("astronaut", "chelsea", "coffee", "rocket", "camera")
        sources = [(Image.fromarray(getattr(data, k)()).convert("RGB"), None) for k in names]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img, label = sources[i % len(sources)]
        side = int(rng.integers(256, 801))
        scale = side / max(img.size)
        im = img.resize((max(32, round(img.width * scale)), max(32, round(img.height * scale))))
        path = out / f"img{i:06d}.jpg"
        im.save(path, quality=int(rng.integers(70, 96)))
        rows.append((str(path), label))
    return rows


def decode_ms(rows: list[tuple[str, int]], preprocess, k: int = 200) -> float:
    """Milliseconds per image to read, decode and preprocess on one CPU thread."""
    import torch

    from pipeline.data.decode import load_row
    from pipeline.data.manifest import Row

    torch.set_num_threads(1)
    t = time.perf_counter()
    for i, (uri, _) in enumerate(rows[:k]):
        load_row(Row(i, uri, None, None), preprocess)
    torch.set_num_threads(os.cpu_count() or 1)
    return (time.perf_counter() - t) / min(k, len(rows)) * 1000


class GpuSampler:
    """GPU utilisation with wall-clock times while a run goes on.

    NVML (``pynvml``, from nvidia-ml-py on the device image) at 10 Hz, else ``nvidia-smi``
    at 2 Hz. Each sample is the driver's share of its last sampling period in which a kernel
    ran, so idle shares over windows shorter than that period are approximate.
    """

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (time.time(), percent busy)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._read = self._nvml_reader() or self._smi_reader()
        self.available = self._read is not None

    @staticmethod
    def _nvml_reader():
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            return 0.1, lambda: float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception:  # no NVML, no GPU: fall back
            return None

    @staticmethod
    def _smi_reader():
        if shutil.which("nvidia-smi") is None:
            return None

        def read() -> float:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5,
            ).stdout.split()  # fmt: skip
            return float(out[0])

        return 0.5, read

    def _loop(self) -> None:
        period, read = self._read
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), read()))
            except Exception:  # a missed sample is not worth stopping the run for
                pass
            self._stop.wait(period)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=10)

    @property
    def busy(self) -> float:
        return float(np.mean([u for _, u in self.samples])) / 100 if self.samples else float("nan")

    def idle_share(self, windows: list[tuple[float, float]]) -> float | None:
        """Mean idle share (1 - busy) of the samples inside the given wall-clock windows."""
        inside = [u for t, u in self.samples if any(a <= t <= b for a, b in windows)]
        return round(1 - float(np.mean(inside)) / 100, 3) if inside else None


def write_windows(store: Path, write_s: float) -> list[tuple[float, float]]:
    """Wall-clock windows in which units were written: each marker is written last, so a
    unit's write ends at its marker's mtime and began about the mean write time before."""
    from pipeline.store.layout import MARKERS

    ends = [m.stat().st_mtime for m in (store / MARKERS).glob("unit-*/zarr.json")]
    return [(e - write_s, e) for e in ends]


def library_rate(cam, x_all, batch: int, device, min_s: float = 3.0) -> tuple[float, float]:
    """(images/s, forwards/s) of the CAM alone on pre-decoded tensors.

    One warm-up batch (auto-tuning, cuDNN plans), then batches over ``x_all`` in turn until
    ``min_s`` seconds have passed (at least one). Forwards are the CAM's own count.
    """
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    starts = list(range(0, max(1, x_all.shape[0] - batch + 1), batch))
    with cam:
        cam(x_all[:batch].to(device))
        sync()
        t = time.perf_counter()
        n = fwd = i = 0
        while True:
            s = starts[i % len(starts)]
            r = cam(x_all[s : s + batch].to(device))
            n += min(batch, x_all.shape[0] - s)
            fwd += int(getattr(r, "forwards", 0))
            i += 1
            sync()
            if time.perf_counter() - t >= min_s:
                break
    dt = time.perf_counter() - t
    return n / dt, fwd / dt


def gpu_decode_ms(rows: list[tuple[str, int]], k: int = 128) -> dict:
    """``torchvision.io.decode_jpeg(device="cuda")`` on a batch, ms/image (measured only:
    the pipeline decodes on the CPU; this says whether moving it would be worth it)."""
    import torch
    from torchvision.io import decode_jpeg, read_file

    if not torch.cuda.is_available():
        return {"gpu_decode": "no CUDA"}
    try:
        datas = [read_file(u) for u, _ in rows[:k]]
        decode_jpeg(datas[:8], device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            decode_jpeg(datas, device="cuda")
        torch.cuda.synchronize()
        return {"gpu_decode_ms_per_image": round((time.perf_counter() - t) / (3 * len(datas))
                                                 * 1000, 3)}  # fmt: skip
    except Exception as e:  # noqa: BLE001 (reported, not raised: a measurement)
        return {"gpu_decode": f"failed: {type(e).__name__}: {e}"[:200]}


class Report:
    """``gpu_pipeline.json`` and ``.md``, rewritten after every step: a command stopped at its
    time limit still returns every number measured so far."""

    def __init__(self, out: Path, results: dict, cpu: bool) -> None:
        self.out, self.r, self.cpu = out, results, cpu

    def save(self) -> None:
        (self.out / "gpu_pipeline.json").write_text(json.dumps(self.r, indent=1))
        r = self.r
        md = [f"# gpu_pipeline ({'CPU smoke mode' if self.cpu else 'GPU'})", "", r["title"], ""]
        md += _md_table(PRESET_HEADER, PRESET_KEYS, r["library"])
        md += _md_table(HEADER, KEYS, r["rows"])
        md += [f"- {k}: {v}" for k, v in r["summary"].items()]
        (self.out / "gpu_pipeline.md").write_text("\n".join(md) + "\n")


def _md_table(header: list[str], keys: list[str], rows: list[dict]) -> list[str]:
    if not rows:
        return []
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return md + ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in rows] + [""]


PRESET_HEADER = ["method", "precision", "batch", "img/s", "forwards/s", "forwards/s vs paper"]
PRESET_KEYS = ["method", "precision", "batch", "images_per_s", "forwards_per_s",
               "forwards_vs_paper"]  # fmt: skip
HEADER = ["config", "images", "explaining img/s", "end-to-end img/s", "library img/s", "ratio",
          "GPU busy", "GPU idle while writing", "start-up s", "write ms/unit",
          "decode threads to feed", "actor CPUs", "ImageNet train h, 8 GPUs"]  # fmt: skip
KEYS = ["config", "images", "images_per_s_explaining", "images_per_s_end_to_end",
        "library_images_per_s", "ratio_pipeline_to_library", "gpu_busy",
        "gpu_idle_while_writing", "startup_s", "write_ms_per_unit", "decode_threads_to_feed",
        "actor_cpus", "imagenet_train_hours_8_gpus"]  # fmt: skip


def make_method(method: str, preset: str, precision: str, net, layer: str, cpu: bool = False):
    """The CAM a config names (``unioncam`` with a preset, or a component method).

    ``cpu`` (the smoke mode): a fixed chunk and memory format, since the auto-tuner's ~7 s per
    CAM on a 2-core CPU would be most of the smoke test; on a GPU the tuner runs, as in use.
    """
    from unioncam import UnionCAM, UnionCAMConfig, make_cam

    autocast = None if precision == "fp32" else precision
    if method == "unioncam":
        fixed = {"chunk_size": 64, "channels_last": False} if cpu else {}
        return UnionCAM(net, layer, config=UnionCAMConfig.preset(preset or "faithful",
                                                                 autocast=autocast), **fixed)  # fmt: skip
    return make_cam(method, net, layer, autocast=autocast)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="smoke mode without a GPU (tiny sizes)")
    p.add_argument("--images", type=int, help="photos to explain (default 2048; --cpu: 16)")
    p.add_argument("--paper-images", type=int, help="photos for `paper` end to end (default "
                   "128: Score-CAM's 2,048 forwards/image make 2,048 photos take ~7 min)")
    p.add_argument("--photos", choices=("auto", "sample", "skimage"), default="auto",
                   help="where the JPEGs are re-encoded from (auto: the ImageNet sample if "
                   "present, else scikit-image's bundled photos, as on the GPU machine)")
    p.add_argument("--model", help="default resnet50 (random weights); --cpu: resnet18")
    p.add_argument("--layer", default="layer4")
    p.add_argument("--image-size", type=int, help="default 224; --cpu: 64")
    p.add_argument("--batch-size", type=int, help="default 64; --cpu: 4 (paper: a quarter)")
    p.add_argument("--batches", help="library sweep batch sizes (default 32,64,128; --cpu: 4)")
    p.add_argument("--unit-size", type=int, help="default 256; --cpu: 8")
    p.add_argument("--configs", help="method:preset:precision list, e.g. "
                   "unioncam:faithful:fp32,unioncam:paper:fp32,gradcam::bf16")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="seconds left for this script: a step that would not fit is skipped")
    p.add_argument("--out", default="benchmarks/out/gpu_pipeline")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    cpu = a.cpu
    n = a.images or (16 if cpu else 2048)
    model = a.model or ("resnet18" if cpu else "resnet50")
    size = a.image_size or (64 if cpu else 224)
    batch = a.batch_size or (4 if cpu else 64)
    unit = a.unit_size or (8 if cpu else 256)
    batches = [int(b) for b in (a.batches or ("4" if cpu else "32,64,128")).split(",")]
    configs = a.configs or ("unioncam:faithful:fp32,gradcam::fp32" if cpu else
                            "unioncam:faithful:fp32,gradcam::fp32,unioncam:faithful:bf16,"
                            "gradcam::bf16,unioncam:paper:fp32,unioncam:paper:bf16")  # fmt: skip
    specs = []
    for c in configs.split(","):
        m, pr, prec = (c.split(":") + ["", ""])[:3]
        specs.append((m, (pr or "faithful") if m == "unioncam" else "", prec or "fp32"))
    n_paper = min(n, a.paper_images or (n if cpu else 128))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t_start)

    import ray
    import torch

    from pipeline.config import RunConfig
    from pipeline.data.build import build_from_list
    from pipeline.data.decode import load_row
    from pipeline.data.manifest import Row
    from pipeline.run.driver import run
    from unioncam import load_model

    device = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_pipeline_"))
    results: dict = {"machine": machine_line(device), "images": n, "paper_images": n_paper,
                     "model": model, "layer": a.layer, "image_size": size, "batch_size": batch,
                     "unit_size": unit, "library": [], "rows": [], "summary": {},
                     "skipped": []}  # fmt: skip
    results["title"] = (f"{model} @ {a.layer}, {size} px, batch {batch}, unit {unit}, {n} JPEGs "
                        f"(paper: {n_paper}); {results['machine']}")  # fmt: skip
    rep = Report(out, results, cpu)
    summary = results["summary"]
    try:
        t = time.perf_counter()
        rows = make_photos(n, tmp / "photos", source=a.photos)
        results["photo_seconds"] = round(time.perf_counter() - t, 1)
        loaded = load_model(model)
        pre = loaded.preprocess.with_size(size)
        k = min(n, 2 * max(batches + [batch]))
        x_all = torch.stack([load_row(Row(i, u, None, None), pre)[0]
                             for i, (u, _) in enumerate(rows[:k])])  # fmt: skip
        net = loaded.model.to(device)

        # 1. The library alone: the default preset's forwards/s against paper's (goal >= 0.9),
        #    at each batch size, fp32 and bf16; Grad-CAM at the pipeline's batch.
        lib: dict[tuple[str, str, str, int], float] = {}
        precisions = list(dict.fromkeys(pr for _, _, pr in specs))
        paper_batch = max(1, batch // 4)
        sweep = []
        for pr in precisions:
            sweep.append(("unioncam", "paper", pr, paper_batch))
            sweep += [("unioncam", "faithful", pr, b) for b in batches]
            for m, preset, prec in specs:  # what the pipeline rows need for their ratio
                b = paper_batch if (m, preset) == ("unioncam", "paper") else batch
                if prec == pr and (m, preset, pr, b) not in sweep:
                    sweep.append((m, preset, pr, b))
        for method, preset, pr, b in sweep:
            if left() < 30:
                results["skipped"].append(f"library {method} {preset} {pr} b{b}: time")
                continue
            ips, fps = library_rate(make_method(method, preset, pr, net, a.layer, cpu), x_all, b,
                                    device, min_s=1.0 if cpu else 3.0)  # fmt: skip
            lib[(method, preset, pr, b)] = ips
            paper = [r for r in results["library"] if r["method"] == "unioncam paper"
                     and r["precision"] == pr]  # fmt: skip
            row = {"method": f"{method} {preset}".strip(), "precision": pr, "batch": b,
                   "images_per_s": round(ips, 2), "forwards_per_s": round(fps, 1),
                   "forwards_vs_paper": round(fps / paper[0]["forwards_per_s"], 3)
                   if paper and method == "unioncam" and preset != "paper"
                   and paper[0]["forwards_per_s"] else None}  # fmt: skip
            results["library"].append(row)
            print(json.dumps(row), flush=True)
            rep.save()
        if device.type == "cuda":  # the sweep's cached blocks: the actor needs the memory
            torch.cuda.empty_cache()
        vs = [r["forwards_vs_paper"] for r in results["library"]
              if r["method"] == "unioncam faithful" and r["forwards_vs_paper"]]  # fmt: skip
        if vs:
            summary["default forwards/s vs paper, best batch (goal >= 0.9)"] = max(vs)

        # 2. Decode: CPU ms/image on one thread, the GPU decoder for comparison.
        results["decode_ms_per_image"] = round(decode_ms(rows, pre, k=64 if cpu else 200), 2)
        results.update(gpu_decode_ms(rows) if device.type == "cuda" else {"gpu_decode": "no CUDA"})
        rep.save()

        # 3. The pipeline end to end, with the library alone's rate from step 1 (same method,
        #    batch, precision) for the ratio.
        manifest = build_from_list(rows, tmp / "m.parquet", unit_size=unit)
        paper_unit = max(1, min(unit, n_paper // 4))
        paper_manifest = build_from_list(rows[:n_paper], tmp / "paper.parquet",
                                         unit_size=paper_unit)  # fmt: skip
        # address="local": always a cluster of our own, never one another job left running.
        ray.init(address="local", include_dashboard=False, logging_level="ERROR",
                 **({"num_cpus": os.cpu_count(), "num_gpus": 0} if cpu else {}))  # fmt: skip
        for method, preset, precision in specs:
            is_paper = method == "unioncam" and preset == "paper"
            images, b = (n_paper, paper_batch) if is_paper else (n, batch)
            name = f"{method} {preset} {precision}".replace("  ", " ")
            if left() < (90 if is_paper else 60):
                results["skipped"].append(f"pipeline {name}: time")
                continue
            from unioncam import UnionCAMConfig

            cfg = UnionCAMConfig.preset(preset or "faithful",
                                        autocast=None if precision == "fp32" else precision)
            store = tmp / f"{method}-{preset}-{precision}.zarr"
            rc = RunConfig(manifest=str((paper_manifest if is_paper else manifest).uri),
                           store=str(store), model=model, layer=a.layer, methods=(method,),
                           preset=cfg, image_size=size, batch_size=b, actors=1, cpu_only=cpu,
                           progress=False, dashboard=False, ray_metrics=False)  # fmt: skip
            with GpuSampler() as gpu:
                s = run(rc)
            act = s.actors[0] if s.actors else None
            write_s = act.write_s / max(1, act.units) if act else 0.0
            idle = gpu.idle_share(write_windows(store, write_s)) if act else None
            rate = s.images_processed / s.explain_s if s.explain_s else float("nan")
            lib_rate = lib.get((method, preset, precision, b))
            row = {
                "config": name,
                "images": images,
                "images_per_s_explaining": round(rate, 2),
                "images_per_s_end_to_end": round(s.images_per_s, 2),
                "library_images_per_s": round(lib_rate, 2) if lib_rate else None,
                "ratio_pipeline_to_library": round(rate / lib_rate, 3) if lib_rate else None,
                "gpu_busy": None if gpu.busy != gpu.busy else round(gpu.busy, 3),
                "gpu_idle_while_writing": idle,
                "startup_s": round(s.startup_s, 1),
                "write_ms_per_unit": round(1000 * write_s, 1) if act else None,
                "decode_threads_to_feed": round(rate * results["decode_ms_per_image"] / 1000, 3),
                "actor_cpus": act.cpus if act else None,
                "imagenet_train_hours_8_gpus": round(IMAGENET_TRAIN / (8 * rate) / 3600, 2)
                if rate == rate and rate > 0 else None,
                "images_ok": s.images_ok,
            }  # fmt: skip
            if act and act.cpus:
                row["cpu_decode_keeps_up"] = row["decode_threads_to_feed"] <= 0.8 * act.cpus
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(store, ignore_errors=True)
            if name == "unioncam faithful fp32":
                summary["default fp32 img/s per GPU while explaining (goal >= 44.4)"] = row[
                    "images_per_s_explaining"]
                summary["default fp32 img/s end to end, start-up included"] = row[
                    "images_per_s_end_to_end"]
                summary["ImageNet train on 8 GPUs, default fp32, h"] = row[
                    "imagenet_train_hours_8_gpus"]
            if method == "gradcam":
                summary[f"Grad-CAM {precision} img/s per GPU (goal >= 270)"] = row[
                    "images_per_s_explaining"]
            rep.save()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        results["seconds"] = round(time.perf_counter() - t_start, 1)
        rep.save()
    table("library alone: " + results["title"], PRESET_HEADER,
          [[r[k] for k in PRESET_KEYS] for r in results["library"]])
    table(f"pipeline end to end; decode {results.get('decode_ms_per_image')} ms/image on one CPU "
          f"thread, GPU decode {results.get('gpu_decode_ms_per_image', results.get('gpu_decode'))}",
          HEADER, [[r[k] for k in KEYS] for r in results["rows"]])  # fmt: skip
    for k, v in summary.items():
        print(f"{k}: {v}")
    if results["skipped"]:
        print("skipped (time budget): " + "; ".join(results["skipped"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
