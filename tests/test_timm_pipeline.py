"""The pipeline runs timm transformers unchanged: ``unioncam run --model timm:<vit> --weights
ckpt.safetensors`` writes the maps the library gives, records the weights' hash and the
model's own preprocessing, resumes, and refuses a checkpoint file that changed under the store.

Real console script (``python -m pipeline.cli``), local Ray, a random-weight ViT-Tiny saved
to a file by the test, two photos at 64 px (a 4×4 patch grid), the ``fast`` preset.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

#: The slow end-to-end tier (`python -m pytest -m slow`; .ci/run runs it).
pytestmark = pytest.mark.slow
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from pipeline.cli import main  # noqa: E402
from pipeline.data.build import build_from_list  # noqa: E402
from pipeline.data.decode import Status, load_row  # noqa: E402
from pipeline.data.manifest import Row  # noqa: E402
from pipeline.store.io import open_store  # noqa: E402
from pipeline.store.units import done_units  # noqa: E402
from unioncam import UnionCAM, UnionCAMConfig, load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "timm:vit_tiny_patch16_224"
SIZE = 64
ARGS = ["--model", MODEL, "--image-size", str(SIZE), "--preset", "fast", "--groups", "4",
        "--chunk-size", "8", "--cpu", "--actors", "1", "--cpus-per-actor", "1",
        "--batch-size", "2", "--no-progress", "--no-dashboard", "--no-ray-metrics"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def _save_vit(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    state = timm.create_model(MODEL.removeprefix("timm:"), pretrained=False).state_dict()
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def rows(sample_dir, sample_labels) -> list[tuple[str, int]]:
    picked = [sample_labels[i] for i in (1, 3)]  # chelsea, motorcycle
    return [(str(sample_dir / r["file"]), int(r["class_index"])) for r in picked]


def test_a_timm_vit_run_writes_the_librarys_maps_and_resumes(tmp_path, rows, capsys):
    manifest = build_from_list(rows, tmp_path / "m.parquet", unit_size=1)  # two units
    ckpt = _save_vit(tmp_path / "vit.safetensors", seed=0)
    store = tmp_path / "vit.zarr"
    cmd = ["run", str(manifest.uri), str(store), "--weights", ckpt, *ARGS]

    first = _cli(*cmd, "--max-units", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert done_units(str(store)) == {0}
    marker = store / "markers" / "unit-000000" / "zarr.json"
    before = marker.stat().st_mtime_ns
    second = _cli(*cmd)  # the same command resumes: only unit 1 is left
    assert second.returncode == 0, second.stderr[-3000:]
    assert done_units(str(store)) == {0, 1}
    assert marker.stat().st_mtime_ns == before

    g = open_store(str(store))
    attrs = dict(g.attrs)
    assert attrs["model"] == MODEL and attrs["layer"] == "blocks.11.norm1"
    assert attrs["weights"] == ckpt
    assert attrs["weights_sha256"] == hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()
    assert attrs["preprocess"]["interpolation"] == "bicubic"
    assert attrs["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    maps = np.asarray(g["maps"][:], dtype=np.float32)
    assert (np.asarray(g["status"][:]) == int(Status.OK)).all()
    assert maps.shape == (2, SIZE, SIZE)
    assert (maps.reshape(2, -1).max(1) - maps.reshape(2, -1).min(1) > 0.5).all()

    # The library on the same rows, same weights, same preprocessing.
    loaded = load_model(MODEL, weights=ckpt)
    pre = loaded.preprocess.with_size(SIZE)
    x = torch.stack([load_row(Row(i, uri, None, None), pre)[0] for i, (uri, _) in enumerate(rows)])
    config = UnionCAMConfig.preset("fast", groups=4, chunk_size=8)
    with UnionCAM(loaded.model, config=config) as cam:
        res = cam(x)
    np.testing.assert_allclose(maps, res.maps.numpy(), atol=2e-3)
    np.testing.assert_array_equal(np.asarray(g["target"][:]), res.target.numpy())

    # The same path holding other weights is another run: refused, one line, nothing written.
    _save_vit(Path(ckpt), seed=1)
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "weights_sha256: store " in err, err
    assert marker.stat().st_mtime_ns == before


def test_a_pickled_checkpoint_is_one_line_and_nothing_runs(tmp_path, rows, capsys):
    manifest = build_from_list(rows, tmp_path / "m.parquet", unit_size=1)
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    store = tmp_path / "never.zarr"
    assert main(["run", str(manifest.uri), str(store), "--weights", str(pickled), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not a weights-only checkpoint" in err, err
    assert err.startswith("unioncam run: error: weights: ")
    assert not store.exists()



@pytest.mark.parametrize(
    ("name", "size", "layer"),
    [("resnet18", 64, "layer4"), ("swin_tiny_patch4_window7_224", 224, "layers.3")],
)
def test_a_timm_resnet_and_swin_run_from_their_checkpoints(tmp_path, rows, name, size, layer):
    """The issue's other two families through ``unioncam run --model timm:<name> --weights``
    (Grad-CAM: one forward and one backward, so a full-size Swin stays cheap on a CPU)."""
    torch.manual_seed(0)
    state = timm.create_model(name, pretrained=False).state_dict()
    ckpt = tmp_path / f"{name}.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    manifest = build_from_list(rows, tmp_path / "m.parquet", unit_size=2)
    store = tmp_path / f"{name}.zarr"
    out = _cli("run", str(manifest.uri), str(store), "--model", f"timm:{name}", "--weights",
               str(ckpt), "--method", "gradcam", "--image-size", str(size), "--cpu",
               "--actors", "1", "--cpus-per-actor", "1", "--batch-size", "2", "--no-progress",
               "--no-dashboard", "--no-ray-metrics")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    g = open_store(str(store))
    assert g.attrs["layer"] == layer and g.attrs["methods"] == ["gradcam"]
    assert (np.asarray(g["status"][:]) == int(Status.OK)).all()
    maps = np.asarray(g["maps"][:], dtype=np.float32).reshape(2, -1)
    assert np.isfinite(maps).all() and (maps.max(1) - maps.min(1) > 0.5).all()
