"""Manifests: builders on real JPEGs, validation errors, unit reads, S3.

The ImageNet-train-like and val-like folders are made of symlinks to the suite's real photo
JPEGs (labelled with ImageNet classes), so the builders see real files and real synset
folder names. The ImageNet tier builds one from the 200-photo ImageNet sample.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.build import build_from_folder, build_from_imagenet_val, build_from_list
from pipeline.data.classes import load_class_list
from pipeline.data.decode import Status, decode_image, read_bytes
from pipeline.data.manifest import Manifest, ManifestError, manifest_schema


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory, sample_dir, sample_labels) -> Path:
    """ImageNet train layout: <synset>/<file>.JPEG for 12 photos of 6 classes (+ noise to
    ignore)."""
    root = tmp_path_factory.mktemp("train")
    for rec in sample_labels[:12]:
        d = root / rec["synset"]
        d.mkdir(exist_ok=True)
        os.symlink(sample_dir / rec["file"], d / rec["file"])
        (d / ".DS_Store").write_bytes(b"junk")  # hidden: skipped
    (root / rec["synset"] / "notes.txt").write_text("not an image")  # extension: skipped
    return root


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory: pytest.TempPathFactory, sample_dir, sample_labels):
    """ImageNet val layout: flat ILSVRC2012_val_XXXXXXXX.JPEG files (10 of them)."""
    root = tmp_path_factory.mktemp("val")
    recs = sample_labels[::2][:10]
    for i, rec in enumerate(recs, start=1):
        os.symlink(sample_dir / rec["file"], root / f"ILSVRC2012_val_{i:08d}.JPEG")
    return root, recs


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------ builders
def test_build_from_folder_classes_sorted(train_dir: Path, tmp_path: Path) -> None:
    m = build_from_folder(train_dir, tmp_path / "train.parquet", unit_size=5)
    assert (m.num_rows, m.num_units, m.unit_size) == (12, 3, 5)
    assert [m.unit_range(u) for u in range(3)] == [(0, 5), (5, 10), (10, 12)]
    pf = pq.ParquetFile(tmp_path / "train.parquet")
    assert [pf.metadata.row_group(i).num_rows for i in range(3)] == [5, 5, 2]
    synsets = sorted(p.name for p in train_dir.iterdir())
    assert m.classes == synsets and m.has_labels and not m.has_images
    rows = [r for u in range(m.num_units) for r in m.read_unit(u)]
    assert [r.row_id for r in rows] == list(range(12))
    for r in rows:
        assert r.uri is not None and os.path.isabs(r.uri)
        assert r.label == synsets.index(Path(r.uri).parent.name)
    with pytest.raises(IndexError, match="unit 3 out of range"):
        m.unit_range(3)


def test_build_from_folder_with_class_list(
    train_dir: Path, tmp_path: Path, class_csv, sample_labels
) -> None:
    m = build_from_folder(
        train_dir, tmp_path / "t.parquet", layout="classes", class_list=class_csv, unit_size=8
    )
    truth = {r["file"]: int(r["class_index"]) for r in sample_labels}
    rows = m.read_unit(0) + m.read_unit(1)
    assert all(r.label == truth[Path(r.uri).name] for r in rows)
    assert len(m.classes) == 1000 and m.class_names[0] == "tench"
    # The repo's txt class list gives the same labels.
    txt = Path(__file__).resolve().parents[1] / "pipeline" / "imagenet_classes.txt"
    if txt.exists():
        m2 = build_from_folder(train_dir, tmp_path / "t2.parquet", class_list=txt, unit_size=8)
        assert m2.fingerprint == m.fingerprint
    # A folder that is not in the class list is an error naming it.
    with pytest.raises(ManifestError) as e:
        build_from_folder(train_dir, tmp_path / "x.parquet", class_list=["n01440764"])
    assert "is not in the class list" in _one_line(e)


def test_build_from_folder_flat_and_mixed(
    val_dir, train_dir: Path, tmp_path: Path, sample_dir, sample_labels
) -> None:
    root, _ = val_dir
    m = build_from_folder(root, tmp_path / "flat.parquet")
    assert m.num_rows == 10 and m.num_units == 1 and m.unit_size == 1024 and not m.has_labels
    assert all(r.label is None for r in m.read_unit(0))
    mixed = tmp_path / "mixed"
    shutil.copytree(train_dir, mixed, symlinks=True)
    os.symlink(sample_dir / sample_labels[0]["file"], mixed / "top.JPEG")
    with pytest.raises(ManifestError) as e:
        build_from_folder(mixed, tmp_path / "m.parquet")
    assert "both at its top level" in _one_line(e)
    assert build_from_folder(mixed, tmp_path / "m.parquet", layout="flat").num_rows == 1
    with pytest.raises(ManifestError, match="no such directory"):
        build_from_folder(tmp_path / "nope", tmp_path / "n.parquet")


def test_build_from_imagenet_val_formats(val_dir, tmp_path: Path, class_csv) -> None:
    root, recs = val_dir
    truth = [int(r["class_index"]) for r in recs]
    names = sorted(p.name for p in root.iterdir())

    per_line = tmp_path / "gt.txt"
    per_line.write_text("\n".join(str(v) for v in truth) + "\n")
    m = build_from_imagenet_val(root, per_line, tmp_path / "v1.parquet", unit_size=4)
    assert [r.label for u in range(m.num_units) for r in m.read_unit(u)] == truth
    assert [Path(r.uri).name for r in m.read_unit(0)] == names[:4]

    pairs = tmp_path / "gt.csv"  # header, reversed order, labels as synsets
    pairs.write_text(
        "file,synset\n"
        + "".join(f"{n},{r['synset']}\n" for n, r in reversed(list(zip(names, recs, strict=True))))
    )
    m2 = build_from_imagenet_val(root, pairs, tmp_path / "v2.parquet", class_list=class_csv)
    assert [r.label for r in m2.read_unit(0)] == truth

    kaggle = tmp_path / "LOC_val_solution.csv"  # ImageId without extension, boxes after synset
    kaggle.write_text(
        "ImageId,PredictionString\n"
        + "".join(
            f"{Path(n).stem},{r['synset']} 10 20 30 40 {r['synset']} 1 2 3 4\n"
            for n, r in zip(names, recs, strict=True)
        )
    )
    m3 = build_from_imagenet_val(root, kaggle, tmp_path / "v3.parquet", class_list=class_csv)
    assert m3.fingerprint == m2.fingerprint

    with pytest.raises(ManifestError, match="pass class_list"):
        build_from_imagenet_val(root, pairs, tmp_path / "v4.parquet")
    short = tmp_path / "short.txt"
    short.write_text("1\n2\n")
    with pytest.raises(ManifestError) as e:
        build_from_imagenet_val(root, short, tmp_path / "v5.parquet")
    assert "has 2 labels but" in _one_line(e)
    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("\n".join(["1000"] + ["1"] * 9))
    with pytest.raises(ManifestError) as e:
        build_from_imagenet_val(root, devkit, tmp_path / "v6.parquet")
    assert "1-based" in _one_line(e)
    partial = tmp_path / "partial.csv"
    partial.write_text(f"{names[0]},3\n")
    with pytest.raises(ManifestError) as e:
        build_from_imagenet_val(root, partial, tmp_path / "v7.parquet")
    assert "no label for image" in _one_line(e)


def test_build_from_list_variants(tmp_path: Path, sample_dir, sample_labels, class_csv) -> None:
    # labels.csv: file names relative to the CSV's folder, integer class_index labels.
    m = build_from_list(sample_dir / "labels.csv", tmp_path / "l.parquet", unit_size=8)
    assert (m.num_rows, m.num_units) == (24, 3)
    first_file = sample_labels[0]["file"]
    first = m.read_unit(0)[0]
    assert first.uri == str(sample_dir / first_file) and first.label == 967  # espresso
    assert m.read_unit(2)[-1].row_id == 23

    txt = tmp_path / "list.txt"
    txt.write_text(f"{sample_dir / first_file} 0\n# comment\nrel/img.png\n")
    m2 = build_from_list(txt, tmp_path / "l2.parquet")
    rows = m2.read_unit(0)
    assert rows[0].label == 0 and rows[1].label is None
    assert rows[1].uri == str(tmp_path / "rel" / "img.png")

    m3 = build_from_list(
        [(str(sample_dir / first_file), "n01440764"), "s3://bucket/a.jpg"],
        tmp_path / "l3.parquet",
        class_list=class_csv,
    )
    rows = m3.read_unit(0)
    assert rows[0].label == 0 and rows[1].uri == "s3://bucket/a.jpg" and rows[1].label is None
    with pytest.raises(ManifestError, match="negative label"):
        build_from_list([("a.jpg", -2)], tmp_path / "bad.parquet")
    with pytest.raises(ManifestError, match="unit_size"):
        build_from_list(["a.jpg"], tmp_path / "bad.parquet", unit_size=0)


def test_inline_relative_and_copies(tmp_path: Path, sample_dir) -> None:
    """Inline bytes; relative uris resolve against wherever the manifest now lives."""
    src = tmp_path / "ds"
    (src / "imgs").mkdir(parents=True)
    files = sorted(sample_dir.glob("*.JPEG"))[:6]
    for f in files:
        shutil.copy(f, src / "imgs" / f.name)
    m = build_from_folder(src / "imgs", src / "manifest.parquet", relative=True, unit_size=4)
    stored = pq.read_table(src / "manifest.parquet")["uri"].to_pylist()
    assert stored[0] == f"imgs/{files[0].name}"
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    m_moved = Manifest.open(moved / "manifest.parquet")
    row = m_moved.read_unit(0)[0]
    assert row.uri == str(moved / "imgs" / files[0].name)
    assert read_bytes(row.uri) == files[0].read_bytes()
    assert m_moved.fingerprint == m.fingerprint  # stable across copies
    assert Manifest.open(f"file://{moved / 'manifest.parquet'}").num_rows == 6

    inl = build_from_folder(src / "imgs", tmp_path / "inline.parquet", inline=True, unit_size=4)
    assert inl.has_images
    rows = inl.read_unit(1)
    assert [r.data for r in rows] == [f.read_bytes() for f in files[4:]]
    assert decode_image(rows[0].data).mode == "RGB"
    abs_m = build_from_folder(src / "imgs", tmp_path / "abs.parquet", unit_size=4)
    assert inl.fingerprint == abs_m.fingerprint != m.fingerprint  # relative uris differ


def test_reading_a_unit_reads_only_its_row_group(tmp_path: Path, sample_dir) -> None:
    """Proof by damage: zero the image bytes of units 1..3 on disk. Opening (validation
    included) and reading unit 0 still work, so neither touches other units' data."""
    uris = [str(p) for p in sorted(sample_dir.glob("*.JPEG"))[:16]]
    path = tmp_path / "inline.parquet"
    m = build_from_list(uris, path, inline=True, unit_size=4)
    md = pq.ParquetFile(path).metadata
    assert m.has_images
    image_col = pq.ParquetFile(path).schema_arrow.get_field_index("image")
    raw = bytearray(path.read_bytes())
    for g in range(1, 4):
        col = md.row_group(g).column(image_col)
        start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
        raw[start : start + col.total_compressed_size] = bytes(col.total_compressed_size)
    path.write_bytes(bytes(raw))
    m2 = Manifest.open(path)  # validates row ids: must not read image pages
    assert [r.data for r in m2.read_unit(0)] == [Path(u).read_bytes() for u in uris[:4]]
    assert len(m2.fingerprint) == 64
    with pytest.raises(Exception):  # noqa: B017 - the damaged unit really is unreadable
        m2.read_unit(2)


# ------------------------------------------------------------------------------ validation
def _write(path: Path, table: pa.Table, row_group_size: int) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _table(ids, uris=None, labels=None) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "row_id": pa.array(ids, pa.int64()),
            "uri": pa.array(
                uris if uris is not None else [f"/x/{i}.jpg" for i in range(n)], pa.string()
            ),
            "label": pa.array(labels if labels is not None else [0] * n, pa.int32()),
        }
    )


@pytest.mark.parametrize(
    ("table", "rgs", "expected"),
    [
        (pa.table({"uri": ["a"]}), 1, "no 'row_id' column"),
        (pa.table({"row_id": [0], "uri": [3]}), 1, "column 'uri' must be string"),
        (pa.table({"row_id": [0], "uri": ["a"], "label": ["x"]}), 1, "column 'label' must be"),
        (_table([0, 1, 3, 4]), 4, "row_id at position 2 is 3, expected 2"),
        (_table([0, 1, 1, 2]), 4, "row_id at position 2 is 1"),
        (_table([1, 0, 2, 3]), 4, "row_id at position 0 is 1"),
        (_table([0, 1, 2], uris=["a", None, "c"]), 3, "row_id 1 has no a uri"),
        (_table([0, 1, 2], labels=[0, -5, 1]), 3, "row_id 1 has negative label -5"),
        (_table(list(range(0))), 1, "no rows"),
    ],
)
def test_validation_errors(tmp_path: Path, table: pa.Table, rgs: int, expected: str) -> None:
    path = _write(tmp_path / "m.parquet", table, rgs)
    with pytest.raises(ManifestError) as e:
        Manifest.open(path)
    msg = _one_line(e)
    assert expected in msg and str(path) in msg


def test_row_group_sizes_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "rg.parquet"
    with pq.ParquetWriter(path, manifest_schema()) as w:
        for ids in ([0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10]):
            w.write_table(_table(ids).cast(manifest_schema()))
    with pytest.raises(ManifestError) as e:
        Manifest.open(path)
    assert "row group 1 has 3 rows, expected 4" in _one_line(e)
    # A hand-written but well-formed manifest (pandas-style int64 labels) is accepted.
    ok = _write(tmp_path / "ok.parquet", _table(list(range(10))), 4)
    m = Manifest.open(ok)
    assert (m.num_units, m.unit_size, m.unit_range(2)) == (3, 4, (8, 10))


def test_inline_rows_may_lack_uri_and_bad_files(tmp_path: Path, sample_dir, sample_labels) -> None:
    data = (sample_dir / sample_labels[0]["file"]).read_bytes()
    t = pa.table(
        {
            "row_id": pa.array([0, 1], pa.int64()),
            "uri": pa.array([None, None], pa.string()),
            "label": pa.array([None, 3], pa.int32()),
            "image": pa.array([data, None], pa.binary()),
        }
    )
    path = _write(tmp_path / "i.parquet", t, 2)
    with pytest.raises(ManifestError, match="row_id 1 has no a uri or inline image"):
        Manifest.open(path)
    good = _write(tmp_path / "g.parquet", t.slice(0, 1), 1)
    row = Manifest.open(good).read_unit(0)[0]
    assert row.uri is None and row.data == data and row.label is None
    with pytest.raises(ManifestError, match="no such file"):
        Manifest.open(tmp_path / "missing.parquet")
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        Manifest.open(tmp_path / "text.parquet")


def test_pickle_and_get_rows(tmp_path: Path, sample_dir, sample_labels) -> None:
    import pickle

    m = build_from_list(sample_dir / "labels.csv", tmp_path / "l.parquet", unit_size=8)
    clone = pickle.loads(pickle.dumps(m))
    assert clone.read_unit(2) == m.read_unit(2) and clone.fingerprint == m.fingerprint
    rows = m.get_rows([13, 3, 23])
    assert [r.row_id for r in rows] == [13, 3, 23]


@pytest.mark.imagenet
def test_the_imagenet_sample_as_a_manifest(imagenet_dir: Path, class_csv, tmp_path: Path) -> None:
    """The 200-photo ImageNet sample's labels.csv as a manifest; its labels are the class
    list's indices of its synsets, with the class list the package ships."""
    import csv

    m = build_from_list(imagenet_dir / "labels.csv", tmp_path / "l.parquet", unit_size=64)
    assert (m.num_rows, m.num_units) == (200, 4)
    first = m.read_unit(0)[0]
    assert first.uri == str(imagenet_dir / "n01440764_tench.JPEG") and first.label == 0
    assert m.read_unit(3)[-1].row_id == 199
    assert [r.row_id for r in m.get_rows([130, 3, 199])] == [130, 3, 199]
    synsets = load_class_list(class_csv).synsets
    with open(imagenet_dir / "labels.csv", newline="") as fh:
        for rec in csv.DictReader(fh):
            assert synsets[int(rec["class_index"])] == rec["synset"]
    shipped = imagenet_dir.parent / "imagenet_classes.csv"
    if shipped.is_file():
        assert load_class_list(shipped).synsets == synsets


def test_class_list_parsing(tmp_path: Path, class_csv) -> None:
    cl = load_class_list(class_csv)
    assert len(cl) == 1000 and cl.synsets[0] == "n01440764" and cl.names[1] == "goldfish"
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    cl2 = load_class_list(mapping)
    assert cl2.synsets == ("n01440764", "n01443537") and cl2.names[0] == "tench, Tinca tinca"
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n")
    with pytest.raises(ManifestError, match="appears twice"):
        load_class_list(dup)


# ------------------------------------------------------------------------------ S3
@pytest.fixture(scope="module")
def s3():
    from s3server import S3Server

    with S3Server() as server:
        yield server


def test_manifest_on_s3(s3, tmp_path: Path, sample_dir, sample_labels, class_csv) -> None:
    """Images and manifest on S3 (moto on loopback): build from an s3:// folder with
    relative uris, open from S3, read units and bytes from S3."""
    bucket = s3.make_bucket()
    fs = s3.filesystem()
    recs = sample_labels[:5]
    for rec in recs:
        fs.pipe_file(
            f"{bucket}/train/{rec['synset']}/{rec['file']}", (sample_dir / rec["file"]).read_bytes()
        )
    fs.pipe_file(f"{bucket}/train/{recs[0]['synset']}/broken.JPEG", b"")
    so = s3.storage_options
    m = build_from_folder(
        f"{bucket}/train", f"{bucket}/manifests/train.parquet", class_list=class_csv,
        unit_size=2, storage_options=so, relative=True,
    )  # fmt: skip
    assert (m.num_rows, m.num_units) == (6, 3)
    m2 = Manifest.open(f"{bucket}/manifests/train.parquet", storage_options=so)
    assert m2.fingerprint == m.fingerprint
    rows = [r for u in range(3) for r in m2.read_unit(u)]
    assert all(r.uri.startswith(f"{bucket}/train/") for r in rows)
    truth = {r["file"]: int(r["class_index"]) for r in recs}
    good = [r for r in rows if r.uri.endswith(".JPEG") and "broken" not in r.uri]
    assert all(r.label == truth[r.uri.rsplit("/", 1)[1]] for r in good)
    data = read_bytes(good[0].uri, so)
    assert decode_image(data).mode == "RGB"
    broken = next(r for r in rows if "broken" in r.uri)
    assert read_bytes(broken.uri, so) == b""
    with pytest.raises(Exception) as e:
        read_bytes(f"{bucket}/train/nope.JPEG", so)
    assert getattr(e.value, "status", None) is Status.MISSING
    assert "testing" not in str(e.value)  # the (dummy) secret never shows
    # The S3 manifest file holds no storage options.
    assert b"testing" not in fs.cat_file(f"{bucket}/manifests/train.parquet")
    assert np.array_equal(
        pq.read_table(fs.open(f"{bucket}/manifests/train.parquet"))["row_id"].to_numpy(),
        np.arange(6),
    )


def test_a_directory_where_a_file_is_expected_says_so_in_one_line(tmp_path, sample_dir,
                                                                   sample_labels, capsys):
    """The newcomer's ``unioncam manifest photos12 photos12``, ``run photos12 ...`` and
    ``--weights photos12``: each names the directory, in one line, before any work."""
    from pipeline.cli import main

    photos = tmp_path / "photos12"
    photos.mkdir()
    shutil.copy(sample_dir / sample_labels[0]["file"], photos / "a.jpg")
    manifest = tmp_path / "m.parquet"
    calls = [["manifest", str(photos), str(photos)],
             ["run", str(photos), str(tmp_path / "s.zarr"), "--cpu", "--no-progress"]]
    assert main(["manifest", str(photos), str(manifest)]) == 0
    calls.append(["run", str(manifest), str(tmp_path / "s.zarr"), "--cpu", "--no-progress",
                  "--model", "resnet18", "--weights", str(photos)])  # fmt: skip
    capsys.readouterr()
    for argv in calls:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a directory" in err, err
        assert str(photos) in err or "'photos12'" in err or "photos12" in err, err
        assert "Error" not in err and ".tmp-" not in err, err
    assert not (tmp_path / "s.zarr").exists()
