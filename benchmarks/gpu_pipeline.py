"""The pipeline on a GPU, end to end (issue 14): read, decode, explain, write.

Not a test: one prepared run that prints a table and writes ``gpu_pipeline.{md,json}``.
For each configuration (method, preset, precision) it runs ``unioncam run`` on one actor
over >= 2,000 real JPEGs of ImageNet-like sizes and qualities (re-encoded from the
ImageNet sample, or from scikit-image's photos when the sample is absent), and in the same
process the library alone on pre-decoded tensors of the same photos. It reports:

* images/s while explaining (first actor ready to last unit written) and end to end;
* the library alone (same method, batch size, device) and the ratio (goal >= 0.9);
* the share of time the GPU was busy (``nvidia-smi`` sampled twice a second);
* decode ms/image on one CPU thread, and how many decode threads keep the GPU fed at
  the measured rate (rate x decode seconds per image);
* write ms per unit (inside the actor) and the projected hours for ImageNet train
  (1,281,167 images) on 8 such GPUs at the explaining rate.

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


def make_photos(n: int, out: Path, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` JPEGs re-encoded at varied sizes (long side 256-800 px) and qualities (70-95)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    if (SAMPLE / "labels.csv").exists():
        from common import sample_rows

        sources = [(Image.open(p).convert("RGB"), c) for p, c in sample_rows(min(n, 200))]
    else:  # a machine without the ImageNet sample: the photos scikit-image ships
        from skimage import data

        names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat")
        sources = [(Image.fromarray(getattr(data, k)()).convert("RGB"), -1) for k in names]
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
    """``nvidia-smi`` utilisation sampled twice a second while a run goes on."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5,
                ).stdout.split()  # fmt: skip
                if out:
                    self.samples.append(float(out[0]))
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
            self._stop.wait(0.5)

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
        return float(np.mean(self.samples)) / 100 if self.samples else float("nan")


def library_rate(cam, x_all, batch: int, device) -> float:
    """Images/s of the CAM alone on pre-decoded tensors (one warm-up batch, then timed)."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with cam:
        cam(x_all[:batch].to(device))
        sync()
        t = time.perf_counter()
        n = 0
        for s in range(batch, x_all.shape[0], batch):
            cam(x_all[s : s + batch].to(device))
            n += min(batch, x_all.shape[0] - s)
        sync()
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="smoke mode without a GPU (tiny sizes)")
    p.add_argument("--images", type=int, help="photos to explain (default 2048; --cpu: 16)")
    p.add_argument("--model", help="default resnet50 (random weights); --cpu: resnet18")
    p.add_argument("--layer", default="layer4")
    p.add_argument("--image-size", type=int, help="default 224; --cpu: 64")
    p.add_argument("--batch-size", type=int, help="default 64; --cpu: 4")
    p.add_argument("--unit-size", type=int, help="default 256; --cpu: 8")
    p.add_argument("--configs", help="method:preset:precision list, e.g. "
                   "unioncam:faithful:fp32,unioncam:paper:fp32,gradcam::bf16")  # fmt: skip
    p.add_argument("--library-images", type=int, help="pre-decoded photos for the library "
                   "alone (default 4 batches)")  # fmt: skip
    p.add_argument("--out", default="benchmarks/out/gpu_pipeline")
    a = p.parse_args(argv)
    cpu = a.cpu
    n = a.images or (16 if cpu else 2048)
    model = a.model or ("resnet18" if cpu else "resnet50")
    size = a.image_size or (64 if cpu else 224)
    batch = a.batch_size or (4 if cpu else 64)
    unit = a.unit_size or (8 if cpu else 256)
    configs = a.configs or ("unioncam:faithful:fp32,gradcam::fp32" if cpu else
                            "unioncam:faithful:fp32,unioncam:faithful:bf16,unioncam:paper:fp32,"
                            "gradcam::fp32,gradcam::bf16")  # fmt: skip
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    import ray
    import torch

    from pipeline.config import RunConfig
    from pipeline.data.build import build_from_list
    from pipeline.data.decode import load_row
    from pipeline.data.manifest import Row
    from pipeline.run.driver import run
    from unioncam import UnionCAM, UnionCAMConfig, load_model, make_cam

    device = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_pipeline_"))
    results: dict = {"machine": machine_line(device), "images": n, "model": model,
                     "layer": a.layer, "image_size": size, "batch_size": batch,
                     "unit_size": unit, "rows": []}  # fmt: skip
    try:
        t = time.perf_counter()
        rows = make_photos(n, tmp / "photos")
        results["photo_seconds"] = round(time.perf_counter() - t, 1)
        manifest = build_from_list(rows, tmp / "m.parquet", unit_size=unit)
        loaded = load_model(model)
        pre = loaded.preprocess.with_size(size)
        results["decode_ms_per_image"] = round(decode_ms(rows, pre), 2)
        k = a.library_images or min(n, 4 * batch)
        x_all = torch.stack([load_row(Row(i, u, None, None), pre)[0]
                             for i, (u, _) in enumerate(rows[:k])])  # fmt: skip
        net = loaded.model.to(device)
        ray.init(include_dashboard=False, logging_level="ERROR",
                 **({"num_cpus": os.cpu_count(), "num_gpus": 0} if cpu else {}))  # fmt: skip
        for spec in configs.split(","):
            method, preset, precision = (spec.split(":") + ["", ""])[:3]
            autocast = None if precision in ("", "fp32") else precision
            cfg = UnionCAMConfig.preset(preset or "faithful", autocast=autocast)
            cam = (UnionCAM(net, a.layer, config=cfg) if method == "unioncam"
                   else make_cam(method, net, a.layer, autocast=autocast))  # fmt: skip
            lib = library_rate(cam, x_all, batch, device)
            store = tmp / f"{method}-{preset}-{precision}.zarr"
            rc = RunConfig(manifest=str(manifest.uri), store=str(store), model=model,
                           layer=a.layer, methods=(method,), method=cfg, image_size=size,
                           batch_size=batch, actors=1, cpu_only=cpu, progress=False,
                           dashboard=False, ray_metrics=False)  # fmt: skip
            with GpuSampler() as gpu:
                s = run(rc)
            act = s.actors[0] if s.actors else None
            rate = s.images_processed / s.explain_s if s.explain_s else float("nan")
            row = {
                "config": f"{method}" + (f" {preset}" if method == "unioncam" else "")
                          + f" {precision or 'fp32'}",
                "images_per_s_explaining": round(rate, 2),
                "images_per_s_end_to_end": round(s.images_per_s, 2),
                "library_images_per_s": round(lib, 2),
                "ratio_pipeline_to_library": round(rate / lib, 3) if lib else None,
                "gpu_busy": None if gpu.busy != gpu.busy else round(gpu.busy, 3),
                "startup_s": round(s.startup_s, 1),
                "write_ms_per_unit": round(1000 * act.write_s / max(1, act.units), 1)
                if act else None,
                "decode_threads_to_feed": round(rate * results["decode_ms_per_image"] / 1000, 3),
                "imagenet_train_hours_8_gpus": round(IMAGENET_TRAIN / (8 * rate) / 3600, 2)
                if rate == rate and rate > 0 else None,
                "images_ok": s.images_ok,
            }  # fmt: skip
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(store, ignore_errors=True)
            (out / "gpu_pipeline.json").write_text(json.dumps(results, indent=1))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    header = ["config", "explaining img/s", "end-to-end img/s", "library img/s", "ratio",
              "GPU busy", "start-up s", "write ms/unit", "decode threads to feed",
              "ImageNet train h, 8 GPUs"]  # fmt: skip
    keys = ["config", "images_per_s_explaining", "images_per_s_end_to_end",
            "library_images_per_s", "ratio_pipeline_to_library", "gpu_busy", "startup_s",
            "write_ms_per_unit", "decode_threads_to_feed", "imagenet_train_hours_8_gpus"]
    title = (f"{model} @ {a.layer}, {size} px, batch {batch}, unit {unit}, {n} JPEGs; decode "
             f"{results['decode_ms_per_image']} ms/image on one thread; {results['machine']}")
    table(title, header, [[r[k] for k in keys] for r in results["rows"]])
    md = [f"# gpu_pipeline ({'CPU smoke mode' if cpu else 'GPU'})", "", title, "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in results["rows"]]
    (out / "gpu_pipeline.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
