"""Manifests that point into shards: WebDataset tars and Hugging Face-style Parquet files.

Real files made here from the suite's photos: tars written with :mod:`tarfile` (read back
by the ``webdataset`` package as a cross-check), Parquet shards written with pyarrow in the
``datasets`` layout (``image: struct<bytes, path>`` + ``label`` + the ``huggingface``
ClassLabel metadata) and, in the slow tier, by the ``datasets`` library itself. The same
photos as loose files are the reference: every shard row must give the same bytes, hence
the same model input (here) and the same stored maps (the slow tier runs the pipeline on
a real Ray cluster, locally and on the loopback S3 server).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import shards
from pipeline.data.build import build_from_list
from pipeline.data.build_shards import (
    build_from_parquet_shards,
    build_from_shards,
    build_from_webdataset,
    detect_shards,
)
from pipeline.data.decode import Status, load_row
from pipeline.data.manifest import Manifest, ManifestError
from unioncam.models import Preprocessing

N = 10  # photos: shards of 6 + 4, manifest units of 4, so unit 1 spans two shards
UNIT = 4
NAMES = [f"class{i}" for i in range(1000)]


def _photos(sample_dir: Path, sample_labels) -> list[tuple[Path, int]]:
    return [(sample_dir / r["file"], int(r["class_index"])) for r in sample_labels[:N]]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 0
            tar.addfile(ti, io.BytesIO(data))


def hf_schema(names: list[str] | None) -> pa.Schema:
    """The schema ``datasets`` writes for an Image feature and a ClassLabel."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image), ("label", pa.int64())])
    feats = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": feats}})})


def write_parquet(path: Path, items: list[tuple[bytes | None, int]], row_group: int) -> None:
    images = [None if b is None else {"bytes": b, "path": f"{i}.jpg"}
              for i, (b, _) in enumerate(items)]  # fmt: skip
    t = pa.table({"image": images, "label": [lab for _, lab in items]}, schema=hf_schema(NAMES))
    pq.write_table(t, path, row_group_size=row_group)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sample_dir, sample_labels):
    """The same ten photos as loose files, as two tars and as two Parquet shards."""
    tmp = tmp_path_factory.mktemp("shards")
    photos = _photos(sample_dir, sample_labels)
    wds = tmp / "wds"
    wds.mkdir()
    keys = [f"{'sub/' if i == 2 else ''}s{i:06d}" for i in range(N)]
    for shard, part in (("000000.tar", range(0, 6)), ("000001.tar", range(6, N))):
        write_tar(wds / shard, [m for i in part for m in (
            (f"{keys[i]}.jpg", photos[i][0].read_bytes()),
            (f"{keys[i]}.cls", str(photos[i][1]).encode()))])  # fmt: skip
    hf = tmp / "hf"
    hf.mkdir()
    items = [(p.read_bytes(), lab) for p, lab in photos]
    write_parquet(hf / "train-00000-of-00002.parquet", items[:6], row_group=4)
    write_parquet(hf / "train-00001-of-00002.parquet", items[6:], row_group=3)
    loose = build_from_list([(str(p), lab) for p, lab in photos], tmp / "loose.parquet",
                            unit_size=UNIT)  # fmt: skip
    return {"tmp": tmp, "photos": photos, "keys": keys, "wds": wds, "hf": hf, "loose": loose}


def all_rows(m: Manifest) -> list:
    return [r for u in range(m.num_units) for r in m.read_unit(u)]


# ---------------------------------------------------------------------------- building
def test_webdataset_manifest_points_into_the_tars(dataset, tmp_path):
    wds = pytest.importorskip("webdataset")
    m = build_from_webdataset(dataset["wds"], tmp_path / "w.parquet", unit_size=UNIT)
    assert (m.num_rows, m.num_units, m.shard_kind) == (N, 3, "webdataset")
    rows = all_rows(m)
    shard_of = ["000000.tar"] * 6 + ["000001.tar"] * 4
    assert [r.uri for r in rows] == [
        f"{dataset['wds'] / s}#{k}" for s, k in zip(shard_of, dataset["keys"], strict=True)]
    assert [r.label for r in rows] == [lab for _, lab in dataset["photos"]]
    assert [r.data for r in rows] == [p.read_bytes() for p, _ in dataset["photos"]]
    assert all(r.error is None for r in rows)
    # Nothing copied: no bytes column, a tiny fraction of the images' size.
    assert not m.has_images
    assert os.path.getsize(tmp_path / "w.parquet") < sum(len(r.data) for r in rows) / 20
    # The webdataset package reads the same samples from the same tars.
    urls = [str(dataset["wds"] / s) for s in ("000000.tar", "000001.tar")]
    theirs = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    assert list(theirs) == dataset["keys"]
    for r, key in zip(rows, dataset["keys"], strict=True):
        assert theirs[key]["jpg"] == r.data and int(theirs[key]["cls"]) == r.label


def test_parquet_manifest_points_into_row_groups(dataset, tmp_path):
    m = build_from_parquet_shards(dataset["hf"], tmp_path / "p.parquet", unit_size=UNIT)
    assert (m.num_rows, m.num_units, m.shard_kind) == (N, 3, "parquet")
    assert m.classes == NAMES and m.class_names == NAMES  # the ClassLabel names
    rows = all_rows(m)
    first, second = (dataset["hf"] / f"train-0000{i}-of-00002.parquet" for i in (0, 1))
    assert [r.uri for r in rows] == [f"{first}#{i}" for i in range(6)] + [
        f"{second}#{i}" for i in range(4)]
    assert [r.label for r in rows] == [lab for _, lab in dataset["photos"]]
    assert [r.data for r in rows] == [p.read_bytes() for p, _ in dataset["photos"]]
    t = pq.read_table(tmp_path / "p.parquet")
    assert t["row_group"].to_pylist() == [0] * 4 + [1] * 2 + [0] * 3 + [1]
    assert t["row"].to_pylist() == [0, 1, 2, 3, 0, 1, 0, 1, 2, 0]
    assert not m.has_images and not any(pa.types.is_binary(f.type) for f in t.schema)
    # A configurable label column; an absent one means no labels.
    m2 = build_from_parquet_shards(dataset["hf"], tmp_path / "p2.parquet", label_column="nope")
    assert not m2.has_labels


def test_shard_rows_give_the_loose_files_model_input(dataset, tmp_path):
    """Same bytes -> the one decode path -> the same tensor, size and crop box."""
    pre = Preprocessing().with_size(64)
    loose = [load_row(r, pre) for r in all_rows(dataset["loose"])]
    for m in (build_from_webdataset(dataset["wds"], tmp_path / "w.parquet", unit_size=UNIT),
              build_from_parquet_shards(dataset["hf"], tmp_path / "p.parquet", unit_size=UNIT)):
        for a, b in zip(loose, [load_row(r, pre) for r in all_rows(m)], strict=True):
            assert a[3] == b[3] == Status.OK
            assert a[1:3] == b[1:3]
            assert np.array_equal(a[0].numpy(), b[0].numpy())


def test_detection_and_the_cli(dataset, tmp_path, capsys):
    from pipeline.cli import main

    assert detect_shards(str(dataset["wds"])) == "webdataset"
    assert detect_shards(str(dataset["hf"])) == "parquet"
    assert detect_shards(str(dataset["wds"] / "000001.tar")) == "webdataset"
    assert detect_shards(str(dataset["photos"][0][0].parent)) is None  # loose images
    assert main(["manifest", str(dataset["wds"]), str(tmp_path / "a.parquet"),
                 "--unit-size", "4"]) == 0  # fmt: skip
    assert "10 rows in 3 units of 4 (with labels)" in capsys.readouterr().out
    assert Manifest.open(tmp_path / "a.parquet").shard_kind == "webdataset"
    assert main(["manifest", str(dataset["hf"]), str(tmp_path / "b.parquet"),
                 "--format", "parquet", "--label-column", "label"]) == 0  # fmt: skip
    assert Manifest.open(tmp_path / "b.parquet").shard_kind == "parquet"
    with pytest.raises(ManifestError, match="no .parquet shards"):
        build_from_shards(dataset["wds"], tmp_path / "c.parquet", kind="parquet")
    with pytest.raises(ManifestError, match="in place"):
        build_from_shards(dataset["wds"], tmp_path / "c.parquet", inline=True)


def test_relative_manifest_moves_with_its_shards(dataset, tmp_path):
    import shutil

    src = tmp_path / "data"
    shutil.copytree(dataset["wds"], src / "wds")
    build_from_webdataset(src / "wds", src / "m.parquet", unit_size=UNIT, relative=True)
    assert pq.read_table(src / "m.parquet")["shard"][0].as_py() == "wds/000000.tar"
    shutil.move(src, tmp_path / "moved")
    rows = all_rows(Manifest.open(tmp_path / "moved" / "m.parquet"))
    assert rows[0].uri == f"{tmp_path / 'moved' / 'wds' / '000000.tar'}#{dataset['keys'][0]}"
    assert [r.data for r in rows] == [p.read_bytes() for p, _ in dataset["photos"]]


# --------------------------------------------------------------------------- reading
def test_reads_are_few_per_shard_and_row_group(dataset, tmp_path, monkeypatch):
    assert shards.coalesce([(0, 10), (1000, 5), (20, 5)], max_gap=100) == [
        (0, 25, [0, 2]), (1000, 1005, [1])]
    assert len(shards.coalesce([(0, 10), (10, 10)], max_span=15)) == 2
    spans: list[int] = []
    real = shards._read_ranges

    def counted(shard, ranges, so):
        spans.append(len(ranges))
        return real(shard, ranges, so)

    monkeypatch.setattr(shards, "_read_ranges", counted)
    m = build_from_webdataset(dataset["wds"], tmp_path / "w.parquet", unit_size=UNIT)
    m.read_unit(1)  # rows 4..7: two samples of each tar
    assert spans == [1, 1]  # one read per tar, the .cls members and headers read through

    groups: list[tuple[int, list[str]]] = []
    real_rg = pq.ParquetFile.read_row_group

    def counted_rg(self, i, *a, **kw):
        if "row_id" not in kw["columns"]:  # not the manifest's own row group
            groups.append((i, kw["columns"]))
        return real_rg(self, i, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted_rg)
    m = build_from_parquet_shards(dataset["hf"], tmp_path / "p.parquet", unit_size=UNIT)
    groups.clear()
    rows = m.read_unit(1)  # shard 0 row group 1 (2 rows) + shard 1 row group 0 (2 of 3 rows)
    # one read per source row group, image column only
    assert groups == [(1, ["image"]), (0, ["image"])] and all(r.data for r in rows)


def test_bad_members_are_per_row_statuses_naming_shard_and_key(dataset, tmp_path):
    good = dataset["photos"][0][0].read_bytes()
    d = tmp_path / "bad"
    d.mkdir()
    write_tar(d / "a.tar", [("ok.jpg", good), ("ok.cls", b"3"),
                            ("nolabel.jpg", good),
                            ("noimage.cls", b"1"),
                            ("text.jpg", b"this is not an image\n" * 10), ("text.cls", b"2"),
                            ("cut.jpg", good), ("cut.cls", b"5")])  # fmt: skip
    raw = (d / "a.tar").read_bytes()
    cut_at = raw.index(good, raw.index(b"cut.jpg")) + len(good) // 2
    (d / "a.tar").write_bytes(raw[:cut_at])  # the tar ends inside cut.jpg
    write_tar(d / "b.tar", [("gone.jpg", good), ("gone.cls", b"4")])
    m = build_from_webdataset(d, tmp_path / "bad.parquet", unit_size=3)
    (d / "b.tar").unlink()  # a shard lost after the manifest was built
    pre = Preprocessing().with_size(64)
    got = {r.uri.rsplit("#", 1)[1]: (r, load_row(r, pre)) for r in all_rows(m)}
    assert list(got) == ["ok", "nolabel", "noimage", "text", "cut", "gone"]
    expected = {"ok": Status.OK, "nolabel": Status.OK, "noimage": Status.MISSING,
                "text": Status.UNSUPPORTED, "cut": Status.TRUNCATED, "gone": Status.MISSING}
    for key, (_row, (_t, _s, _b, status, message)) in got.items():
        assert status == expected[key], (key, message)
        if status != Status.OK:
            shard = "b.tar" if key == "gone" else "a.tar"
            assert f"{shard}#{key}" in message and "\n" not in message, message
    assert got["ok"][0].label == 3 and got["nolabel"][0].label is None
    assert "cut short" in got["cut"][1][4] and "not found" in got["gone"][1][4]

    # Parquet: a null image cell and bytes that are not an image.
    write_parquet(d / "p.parquet", [(good, 1), (None, 2), (b"GIF? no", 3)], row_group=2)
    rows = all_rows(build_from_parquet_shards(d / "p.parquet", tmp_path / "bp.parquet"))
    res = [load_row(r, pre) for r in rows]
    assert [x[3] for x in res] == [Status.OK, Status.MISSING, Status.UNSUPPORTED]
    assert "p.parquet#1: null 'image' bytes" in res[1][4] and "p.parquet#2" in res[2][4]


def test_unreadable_shards_are_one_line_build_errors(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(ManifestError, match=r"shard .*x\.tar: not a tar file"):
        build_from_webdataset(tmp_path / "x.tar", tmp_path / "m.parquet")
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "y.parquet")
    with pytest.raises(ManifestError, match=r"y\.parquet: no 'image' column"):
        build_from_parquet_shards(tmp_path / "y.parquet", tmp_path / "m.parquet")


# --------------------------------------------------------------------------------- S3
@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto")
    from s3server import S3Server

    with S3Server() as server:
        yield server


def test_shards_on_s3(s3, dataset):
    bucket = s3.make_bucket()
    fs = s3.filesystem()
    so = s3.storage_options
    for kind in ("wds", "hf"):
        for f in sorted(dataset[kind].iterdir()):
            fs.put_file(str(f), f"{bucket}/{kind}/{f.name}")
    assert detect_shards(f"{bucket}/wds", so) == "webdataset"
    truth = [p.read_bytes() for p, _ in dataset["photos"]]
    for kind, build in (("wds", build_from_webdataset), ("hf", build_from_parquet_shards)):
        m = build(f"{bucket}/{kind}", f"{bucket}/m-{kind}.parquet", unit_size=UNIT,
                  storage_options=so, relative=True)  # fmt: skip
        m = Manifest.open(f"{bucket}/m-{kind}.parquet", storage_options=so)
        rows = all_rows(m)
        assert all(r.uri.startswith(f"{bucket}/{kind}/") and "#" in r.uri for r in rows)
        assert [r.data for r in rows] == truth
        assert [r.label for r in rows] == [lab for _, lab in dataset["photos"]]
    fs.rm(f"{bucket}/wds/000001.tar")
    rows = all_rows(Manifest.open(f"{bucket}/m-wds.parquet", storage_options=so))
    assert [r.error.status for r in rows[6:]] == [Status.MISSING] * 4
    assert "000001.tar" in rows[6].error.message and "testing" not in rows[6].error.message


# ------------------------------------------------------------------ slow: real libraries
@pytest.mark.slow
def test_a_parquet_dataset_written_by_the_datasets_library(dataset, tmp_path):
    datasets = pytest.importorskip("datasets")
    photos = dataset["photos"]
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=NAMES)})  # fmt: skip
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": p.read_bytes(), "path": p.name} for p, _ in photos],
         "label": [lab for _, lab in photos]}, features=feats)  # fmt: skip
    ds.to_parquet(str(tmp_path / "hf" / "train.parquet"))
    m = build_from_shards(tmp_path / "hf", tmp_path / "m.parquet", unit_size=UNIT)
    assert m.shard_kind == "parquet" and m.class_names == NAMES
    rows = all_rows(m)
    assert [r.data for r in rows] == [p.read_bytes() for p, _ in photos]
    assert [r.label for r in rows] == [lab for _, lab in photos]


@pytest.mark.slow
def test_shard_manifests_store_the_same_maps_as_loose_files(dataset, tmp_path):
    """The real pipeline (Ray, the pretrained model) on loose files, tars and Parquet
    shards, locally and with shards, manifests and stores on the loopback S3 server."""
    ray = pytest.importorskip("ray")
    from pipeline.config import RunConfig
    from pipeline.run.driver import run
    from pipeline.store.io import open_store
    from unioncam import UnionCAMConfig

    method = UnionCAMConfig.preset("fast", groups=4, chunk_size=16).to_dict()

    def explain(manifest: str, store: str, so=None) -> dict:
        cfg = RunConfig(manifest=manifest, store=store, preset=method, image_size=64,
                        batch_size=3, progress=False, cpu_only=True, actors=1,
                        cpus_per_actor=2, storage_options=so)  # fmt: skip
        s = run(cfg)
        assert s.complete and s.images_ok == N, s.format()
        g = open_store(store, storage_options=so)
        return {k: np.asarray(g[k][:]) for k in ("maps", "beta", "status", "label", "uri")}

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        ref = explain(dataset["loose"].uri, str(tmp_path / "loose.zarr"))
        w = build_from_webdataset(dataset["wds"], tmp_path / "w.parquet", unit_size=UNIT)
        p = build_from_parquet_shards(dataset["hf"], tmp_path / "p.parquet", unit_size=UNIT)
        got = {"wds": explain(w.uri, str(tmp_path / "w.zarr")),
               "parquet": explain(p.uri, str(tmp_path / "p.zarr"))}  # fmt: skip
        from s3server import S3Server

        with S3Server() as s3:
            bucket, fs, so = s3.make_bucket(), s3.filesystem(), s3.storage_options
            for f in sorted(dataset["wds"].iterdir()):
                fs.put_file(str(f), f"{bucket}/wds/{f.name}")
            m = build_from_webdataset(f"{bucket}/wds", f"{bucket}/w.parquet", unit_size=UNIT,
                                      storage_options=so)  # fmt: skip
            got["s3"] = explain(m.uri, f"{bucket}/w.zarr", so)
        for name, a in got.items():  # the tolerance of test_pipeline_e2e's S3 run
            np.testing.assert_allclose(a["maps"].astype(np.float32),
                                       ref["maps"].astype(np.float32), atol=2e-3, err_msg=name)
            np.testing.assert_allclose(a["beta"], ref["beta"], atol=1e-4, err_msg=name)
            np.testing.assert_array_equal(a["status"], ref["status"], err_msg=name)
            np.testing.assert_array_equal(a["label"], ref["label"], err_msg=name)
            assert all("#" in u for u in a["uri"].tolist()), name
        assert got["wds"]["uri"][0].endswith(f"000000.tar#{dataset['keys'][0]}")
        assert got["parquet"]["uri"][6].endswith("train-00001-of-00002.parquet#0")
    finally:
        ray.shutdown()
