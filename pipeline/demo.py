"""``unioncam demo``: the README's first command, offline, about a minute on 2 cores.

It exercises the real path end to end - JPEG files, a Parquet manifest, a local Ray
instance, the packaged pretrained EfficientNet-Lite0, the Zarr store, a query - on photos
that ship inside scikit-image (no download: only the images bundled in its wheel are used;
several ``skimage.data`` images need ``pooch`` downloads and are avoided).

Configuration and why: the ``fast`` preset (UnionCAM with Group-CAM as the region side,
32 groups, denoised gradient map, paper-style fusion and selection) at 224 px on the
``_conv_head`` layer. Score-CAM (the paper's region side) needs one forward per channel of
the layer, 1,280 for EfficientNet-Lite0's head, i.e. minutes per image on a laptop CPU;
Group-CAM needs 32. The maps are real UnionCAM maps of a real pretrained network; only the
region method is the cheaper one the library offers.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

__all__ = ["DEMO_IMAGES", "run_demo", "write_demo_images"]

#: scikit-image photos bundled in its wheel (no pooch download), and what they show.
DEMO_IMAGES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "clock")


def write_demo_images(folder: Path) -> list[Path]:
    """Save the bundled photos as JPEG files (quality 92) and return their paths."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in DEMO_IMAGES:
        arr = np.asarray(getattr(data, name)())
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) / max(1.0, float(arr.max())) * 255).astype(np.uint8)
        img = Image.fromarray(arr)
        img = img.convert("L" if img.mode in ("L", "1", "I", "F") else "RGB")
        p = folder / f"{name}.jpg"
        img.save(p, format="JPEG", quality=92)
        paths.append(p)
    return paths


def run_demo(
    out: str | os.PathLike = "unioncam-demo",
    *,
    preset: str = "fast",
    image_size: int = 224,
    cpus: int | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> int:
    """Run the demo into ``out``; print a per-image summary; return an exit code."""
    import ray

    from pipeline.analysis.overlays import write_overlays
    from pipeline.analysis.reader import open_reader
    from pipeline.config import RunConfig
    from pipeline.data.build import build_from_folder
    from pipeline.data.classes import load_class_names
    from pipeline.run.driver import run
    from unioncam import DEFAULT_PRESET, UnionCAMConfig

    t0 = time.perf_counter()
    out = Path(out).resolve()
    images = out / "images"
    store = out / "store.zarr"
    manifest = out / "manifest.parquet"
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if overwrite and store.exists():
        shutil.rmtree(store)
    paths = write_demo_images(images)
    say(f"wrote {len(paths)} bundled scikit-image photos to {images}")
    m = build_from_folder(images, manifest, layout="flat", unit_size=2)
    say(f"manifest {manifest}: {m.num_rows} images in {m.num_units} units")

    # chunk_size fixed (speed only): skips the library's chunk auto-tuning, which costs
    # more than this whole demo on a small CPU; 8 is the sweet spot on 2 cores.
    method = UnionCAMConfig.preset(preset, chunk_size=8)
    n_cpus = cpus or os.cpu_count() or 1
    cfg = RunConfig(
        manifest=str(manifest),
        store=str(store),
        model="efficientnet-lite0",
        preset=method,
        image_size=image_size,
        batch_size=2,
        cpu_only=True,
        actors=1,
        cpus_per_actor=n_cpus,
        progress=not quiet,
        ray_metrics=False,
        overwrite=overwrite,
    )
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        say(f"starting a local Ray instance ({n_cpus} CPUs, no dashboard)")
        ray.init(address="local", num_cpus=n_cpus, num_gpus=0, include_dashboard=False, logging_level="ERROR")
        started = True
    try:
        summary = run(cfg)
    finally:
        if started:
            ray.shutdown()

    reader = open_reader(str(store))
    names = load_class_names()
    say("")
    say(
        f"{'image':<12} {'explained class':<26} {'p':>5}  {'selected map':<28} beta of each pool member"
    )
    # Manifest rows are in sorted path order: name each row from its own URI.
    stems = {r.row_id: Path(r.uri or "").stem for u in range(m.num_units) for r in m.read_unit(u)}
    for i in range(m.num_rows):
        r = reader.row(i)
        stem = stems.get(i, str(i))
        if r["status_name"] != "OK":
            say(f"{stem:<12} {r['status_name']}: {r['error']}")
            continue
        c = r["target"]
        cname = names[c] if 0 <= c < len(names) else str(c)
        betas = ", ".join(f"{n}={b:+.3f}" for n, b in zip(reader.pool, r["beta"], strict=True))
        say(f"{stem:<12} {cname[:26]:<26} {r['prob']:>5.2f}  {r['selected_name']:<28} {betas}")
    overlays = write_overlays(reader, range(m.num_rows), out / "overlays", class_names=names)
    say("")
    say(f"store:    {store}  ({summary.images_ok} maps, {summary.images_failed} failed)")
    say(f"overlays: {out / 'overlays'}  ({len(overlays)} PNGs)")
    say(
        f"method:   UnionCAM preset {preset!r} ({', '.join(reader.pool)}), layer {reader.attrs.get('layer')}"
    )
    if preset != DEFAULT_PRESET:
        cost = UnionCAMConfig.preset(preset).forwards_per_image()
        full = UnionCAMConfig.preset(DEFAULT_PRESET).forwards_per_image()
        say(f"          (not the default preset {DEFAULT_PRESET!r}: {preset!r} costs {cost} forwards "
            f"per image against {full}, to keep the demo short on a CPU; "
            f"unioncam run uses {DEFAULT_PRESET!r} unless --preset says otherwise)")
    say(f"done in {time.perf_counter() - t0:.0f} s. Next: unioncam status {store}")
    if not summary.complete:
        print("demo: the run did not complete; rerun 'unioncam demo' to resume", file=sys.stderr)
        return 1
    return 0
