"""Shared fixtures: real photos, the packaged pretrained model, and the ImageNet tier.

The default suite needs nothing beside the clone. Its photos are the natural photos that
ship with scikit-image (a dependency), written once per session as JPEGs of varied sizes,
aspect ratios and encodings with a ``labels.csv`` in the ImageNet sample's format
(``file,class_index,synset,class_name``); ``sample_dir``/``sample_labels``/``photos`` are
that folder.

Tests marked ``imagenet`` use the 200 real ImageNet photos in
``../shared/data/imagenet-sample`` (``imagenet_dir``/``imagenet_labels``/
``imagenet_photos``). Without that folder they are deselected, with one line saying so.

The model is loaded once per session; tests that need speed use small inputs
(48–112 px) and early layers rather than a different model.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
IMAGENET_DIR = REPO.parent / "shared" / "data" / "imagenet-sample"
IMAGENET_FIXTURES = ("imagenet_dir", "imagenet_labels", "imagenet_photos")

# The scikit-image photos and the ImageNet class each shows (its nearest class where
# ImageNet has no exact one: no "motorcycle" class, so "moped"; a launching rocket is
# "missile"). Indices, synsets and names are ImageNet-1k's (pipeline/imagenet_classes.txt).
PHOTO_CLASSES = {
    "coffee": (967, "n07920052", "espresso"),
    "chelsea": (281, "n02123045", "tabby"),
    "rocket": (657, "n03773504", "missile"),
    "motorcycle": (665, "n03785016", "moped"),
    "camera": (872, "n04485082", "tripod"),
    "clock": (892, "n04548280", "wall clock"),
}
# (file stem, source photo, how it is made); a numeric prefix keeps the sorted file order
# equal to labels.csv's order. Row 0 is 500x375 RGB, like the ImageNet sample's first photo.
PHOTO_FILES = [
    ("coffee_crop", "coffee", "crop 50 12 550 387"),
    ("chelsea", "chelsea", ""),
    ("rocket", "rocket", ""),
    ("motorcycle", "motorcycle", ""),
    ("camera_gray", "camera", "gray"),  # a grayscale (mode L) JPEG
    ("clock_gray", "clock", "gray"),
    ("coffee_small", "coffee", "resize 90 60"),  # under 100 px
    ("chelsea_mirror", "chelsea", "mirror"),
    ("rocket_tall", "rocket", "crop 192 0 448 427"),
    ("motorcycle_strip", "motorcycle", "crop 0 150 741 390"),  # aspect ratio 3
    ("coffee_large", "coffee", "resize 1200 800"),
    ("chelsea_face", "chelsea", "crop 80 0 380 300"),
    ("rocket_small", "rocket", "resize 160 107"),
    ("motorcycle_progressive", "motorcycle", "resize 370 250 progressive"),
    ("coffee_portrait", "coffee", "rotate"),
    ("chelsea_q30", "chelsea", "quality 30"),
    ("camera_crop", "camera", "crop 128 64 384 448 rgb"),
    ("motorcycle_mirror", "motorcycle", "mirror"),
    ("motorcycle_square", "motorcycle", "crop 120 0 620 500"),
    ("coffee_444", "coffee", "resize 450 300 subsampling444"),
    ("chelsea_tiny", "chelsea", "resize 64 43"),
    ("rocket_squashed", "rocket", "resize 640 200"),
    ("clock_crop", "clock", "crop 100 50 300 250 rgb"),
    ("motorcycle_small", "motorcycle", "resize 96 65"),
]
#: The six photos of the ``photos`` fixture: one per source photo plus two variants.
PHOTO_ROWS = [0, 1, 3, 4, 8, 14]
#: The ImageNet sample's photos used by ``imagenet_photos`` (the suite's photos before it
#: had its own).
IMAGENET_ROWS = [0, 17, 42, 88, 120, 199]


def _source(name: str):
    from PIL import Image
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return Image.fromarray(img)


def write_photo_folder(root: Path) -> Path:
    """Write the ``PHOTO_FILES`` JPEGs and their ``labels.csv`` into ``root``."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    sources = {name: _source(name) for name in PHOTO_CLASSES}
    rows = []
    for i, (stem, src, how) in enumerate(PHOTO_FILES):
        img, words = sources[src], how.split()
        img = img.convert("L") if "gray" in words else img.convert("RGB")
        save = {"quality": 90}
        if words and words[0] == "crop":
            img = img.crop(tuple(int(v) for v in words[1:5]))
        elif words and words[0] == "resize":
            img = img.resize((int(words[1]), int(words[2])), Image.Resampling.BICUBIC)
        elif "mirror" in words:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif "rotate" in words:
            img = img.transpose(Image.Transpose.ROTATE_90)
        elif "quality" in words:
            save["quality"] = int(words[1])
        if "progressive" in words:
            save["progressive"] = True
        if "subsampling444" in words:
            save.update(subsampling=0, quality=95)
        if "rgb" in words:
            img = img.convert("RGB")
        name = f"{i:02d}_{stem}.JPEG"
        img.save(root / name, "JPEG", **save)
        index, synset, class_name = PHOTO_CLASSES[src]
        rows.append([name, index, synset, class_name])
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "class_index", "synset", "class_name"])
        w.writerows(rows)
    return root


def read_labels(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------
# the default photos: made here from scikit-image's
@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real JPEGs (scikit-image's photos, varied) with an ImageNet-style
    ``labels.csv``."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def sample_labels(sample_dir: Path) -> list[dict[str, str]]:
    return read_labels(sample_dir)


@pytest.fixture(scope="session")
def class_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet-1k's class list as a CSV (``class_index,synset,class_name``), written from
    the class list the package ships."""
    import pipeline

    (txt,) = Path(pipeline.__file__).parent.rglob("imagenet_classes.txt")
    lines = [ln for ln in txt.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    path = tmp_path_factory.mktemp("classes") / "imagenet_classes.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class_index", "synset", "class_name"])
        for i, ln in enumerate(lines):
            synset, name = ln.split("\t", 1)
            w.writerow([i, synset, name])
    return path


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
    return load_batch(effnet, sample_dir, sample_labels, PHOTO_ROWS, 96)


# ---------------------------------------------------------------------------------------
# the ImageNet tier: real ImageNet photos from ../shared
def imagenet_available() -> bool:
    return (IMAGENET_DIR / "labels.csv").is_file()


@pytest.fixture(scope="session")
def imagenet_dir() -> Path:
    if not imagenet_available():  # its tests are deselected then; this is a safety net
        pytest.fail(f"the ImageNet sample is missing: {IMAGENET_DIR}")
    return IMAGENET_DIR


@pytest.fixture(scope="session")
def imagenet_labels(imagenet_dir: Path) -> list[dict[str, str]]:
    return read_labels(imagenet_dir)


@pytest.fixture(scope="session")
def imagenet_photos(effnet, imagenet_dir, imagenet_labels):
    """Six real ImageNet photos at 96 px with their labels."""
    return load_batch(effnet, imagenet_dir, imagenet_labels, IMAGENET_ROWS, 96)


_TIER = pytest.StashKey[tuple[int, bool]]()  # (tests in the tier, whether they run)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses an ImageNet fixture; deselect the tier without the photos."""
    for item in items:
        if any(f in getattr(item, "fixturenames", ()) for f in IMAGENET_FIXTURES):
            item.add_marker(pytest.mark.imagenet)
    tier = [item for item in items if item.get_closest_marker("imagenet")]
    config.stash[_TIER] = (len(tier), imagenet_available())
    if tier and not imagenet_available():
        config.hook.pytest_deselected(items=tier)
        items[:] = [item for item in items if not item.get_closest_marker("imagenet")]


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    """One line on the imagenet tier, whenever the run selected any of it."""
    n, runs = config.stash.get(_TIER, (0, False))
    tests = f"{n} test{'s' if n != 1 else ''}"
    if n and runs:
        terminalreporter.write_line(f"imagenet tier: {tests} selected, on {IMAGENET_DIR}")
    elif n:
        terminalreporter.write_line(
            f"imagenet tier: {tests} deselected (the ImageNet sample is not at "
            f"../shared/data/imagenet-sample)"
        )
