"""Shared fixtures: the real photos in ../shared and the packaged pretrained model.

The model is loaded once per session; tests that need speed use small inputs
(96–112 px) and early layers rather than a different model.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLE_DIR = SHARED / "data" / "imagenet-sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE_DIR / "labels.csv").exists():
        pytest.fail(f"the ImageNet sample is missing: {SAMPLE_DIR} (CI provides ../shared)")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_labels(sample_dir: Path) -> list[dict[str, str]]:
    with open(sample_dir / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def effnet():
    """The packaged ImageNet-pretrained EfficientNet-Lite0 (LoadedModel)."""
    from unioncam import load_model

    torch.manual_seed(0)
    return load_model("efficientnet-lite0")


def load_batch(loaded, sample_dir: Path, labels: list[dict[str, str]], indices, size: int):
    """Real photos preprocessed like the model expects, at a small size for speed."""
    from PIL import Image

    pre = loaded.preprocess.with_size(size)
    xs, ys = [], []
    for i in indices:
        with Image.open(sample_dir / labels[i]["file"]) as img:
            xs.append(pre(img)[0])
        ys.append(int(labels[i]["class_index"]))
    return torch.stack(xs), torch.tensor(ys)


@pytest.fixture(scope="session")
def photos(effnet, sample_dir, sample_labels):
    """Six real photos at 96 px with their ImageNet labels."""
    return load_batch(effnet, sample_dir, sample_labels, [0, 17, 42, 88, 120, 199], 96)
