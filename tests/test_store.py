"""The Zarr v3 store: layout, unit writes, markers, resume rules, xarray, processes, S3.

xarray / pyarrow are imported inside the tests that need them: the spawned writer processes
import this module, and should start fast.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.data.decode import Status
from pipeline.store.io import create_store, finalize_store, open_store, read_layout
from pipeline.store.layout import (
    LAYOUT_ATTR,
    STORE_FORMAT,
    StoreError,
    StoreFormatError,
    StoreLayout,
    StoreMismatchError,
)
from pipeline.store.units import done_units, read_markers, write_unit

POOL = ("region:scorecam", "region:groupcam", "fused:denoised+scorecam")
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"  # must never reach the store


def _attrs(manifest_fp: str = "m" * 64, config_fp: str = "c" * 64) -> dict:
    return {
        "manifest_fingerprint": manifest_fp,
        "config_fingerprint": config_fp,
        "model": "efficientnet-lite0",
        "storage_options": {"key": "AKIAEXAMPLE", "secret": SECRET},  # a careless caller
    }


def _make(path, n=10, unit=4, size=8, **kw):
    """create_store with the test's layout; layout fields among ``kw`` (components, ...)
    go into the layout, the rest (attrs, overwrite, ...) to create_store."""
    kw.setdefault("attrs", _attrs())
    fields = {k: kw.pop(k) for k in ("components", "metrics", "methods", "selection",
                                     "map_size", "map_chunk", "map_codec") if k in kw}
    layout = StoreLayout(num_rows=n, unit_size=unit, image_size=size, pool=POOL, **fields)
    return create_store(path, layout, **kw)


def _unit_data(u: int, rows: int, size: int, *, fail_first: bool = True) -> dict:
    """Deterministic per-unit results (a failed first row when ``fail_first``)."""
    rng = np.random.default_rng(u)
    maps = rng.random((rows, size, size)).astype(np.float32)
    status = np.zeros(rows, np.uint8)
    error = [""] * rows
    if fail_first:
        maps[0] = np.nan
        status[0] = int(Status.TRUNCATED)
        error[0] = f"s3://b/img_{u}.JPEG: truncated image data"
    return {
        "maps": maps,
        "beta": rng.random((rows, len(POOL))).astype(np.float32),
        "selected": rng.integers(0, len(POOL), rows),
        "target": rng.integers(0, 1000, rows),
        "label": np.full(rows, -1),
        "predicted": rng.integers(0, 1000, rows),
        "prob": rng.random(rows).astype(np.float32),
        "baseline_prob": rng.random(rows).astype(np.float32),
        "orig_size": np.tile([375, 500], (rows, 1)),
        "crop_box": np.tile([85, 23, 415, 352], (rows, 1)),
        "status": status,
        "error": error,
    }


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file of the store except markers (they carry timestamps)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            rel = p.relative_to(path).as_posix()
            if not rel.startswith("markers/unit-"):
                out[rel] = p.read_bytes()
    return out


def _check_unit(group: zarr.Group, u: int, unit: int, n: int, size: int) -> None:
    start, stop = u * unit, min((u + 1) * unit, n)
    exp = _unit_data(u, stop - start, size)
    got_maps = group["maps"][start:stop]
    assert got_maps.dtype == np.float16
    np.testing.assert_array_equal(got_maps, exp["maps"].astype(np.float16))
    np.testing.assert_array_equal(group["beta"][start:stop], exp["beta"])
    np.testing.assert_array_equal(group["status"][start:stop], exp["status"])
    np.testing.assert_array_equal(group["selected"][start:stop], exp["selected"])
    assert list(group["error"][start:stop]) == exp["error"]


# ------------------------------------------------------------------------------ layout
def test_layout_dtypes_chunks_shards(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _make(path, n=10, unit=4, size=8, components=("region:scorecam",), metrics=("insertion",))
    g = zarr.open_group(str(path), mode="r")
    expect = {
        "maps": ("float16", ("image", "y", "x"), (10, 8, 8)),
        "beta": ("float32", ("image", "pool"), (10, 3)),
        "selected": ("int8", ("image",), (10,)),
        "target": ("int32", ("image",), (10,)),
        "label": ("int32", ("image",), (10,)),
        "predicted": ("int32", ("image",), (10,)),
        "prob": ("float32", ("image",), (10,)),
        "baseline_prob": ("float32", ("image",), (10,)),
        "orig_size": ("int32", ("image", "hw"), (10, 2)),
        "crop_box": ("int32", ("image", "box"), (10, 4)),
        "status": ("uint8", ("image",), (10,)),
        "components/region_scorecam": ("float16", ("image", "y", "x"), (10, 8, 8)),
        "metrics/insertion": ("float32", ("image",), (10,)),
    }
    for name, (dtype, dims, shape) in expect.items():
        a = g[name]
        assert (str(a.dtype), a.metadata.dimension_names, a.shape) == (dtype, dims, shape), name
        # One unit == one shard (sharded maps) or one chunk (everything else).
        assert (a.shards or a.chunks)[0] == 4, name
    # Maps: a shard per unit of map_chunk-row inner chunks (here the whole unit of 8-px maps).
    assert g["maps"].chunks == (4, 8, 8) and g["maps"].shards == (4, 8, 8)
    assert g["error"].metadata.dimension_names == ("image",)
    assert g["status"].fill_value == 255 and np.isnan(g["maps"].fill_value)
    assert g["beta"].attrs["pool"] == list(POOL)
    assert g["components/region_scorecam"].attrs["name"] == "region:scorecam"
    assert list(g["pool"][:]) == list(POOL)
    lay = read_layout(path)
    assert (lay.num_units, lay.unit_range(2), lay.image_size) == (3, (8, 10), (8, 8))
    # Secrets are redacted from the attributes (defence in depth).
    assert g.attrs["storage_options"]["secret"] == "<redacted>"
    assert all(SECRET.encode() not in b for b in _snapshot(path).values())


def test_write_unit_markers_and_fill_values(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _make(path, n=10, unit=4, size=8)
    assert done_units(path) == set()
    marker = write_unit(path, read_layout(path), 2, _unit_data(2, 2, 8), info={"seconds": 1.5, "token": SECRET})
    assert marker["rows"] == 2 and marker["ok"] == 1 and marker["failed"] == 1
    assert marker["by_status"] == {"OK": 1, "TRUNCATED": 1} and marker["seconds"] == 1.5
    assert done_units(path) == {2}
    assert read_markers(path)[2]["token"] == "<redacted>"
    g = zarr.open_group(str(path), mode="r")
    _check_unit(g, 2, 4, 10, 8)
    # Rows of units nobody wrote read as "not written": PENDING, NaN, -1, "".
    assert (g["status"][:8] == 255).all() and np.isnan(g["maps"][:8]).all()
    assert (g["target"][:8] == -1).all() and list(g["error"][:8]) == [""] * 8
    # Arrays not given are written with their fill value (so rewrites are complete).
    data = _unit_data(0, 4, 8)
    del data["prob"], data["crop_box"]
    write_unit(path, read_layout(path), 0, data)
    assert np.isnan(g["prob"][:4]).all() and (g["crop_box"][:4] == -1).all()
    assert all(SECRET.encode() not in b for b in _snapshot(path).values())
    assert SECRET not in (path / "markers" / "unit-000002" / "zarr.json").read_text()


def test_write_unit_rejects_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _make(path, n=10, unit=4, size=8)
    good = _unit_data(0, 4, 8)
    cases = [
        ({**good, "mapz": good["maps"]}, "unknown array"),
        ({k: v for k, v in good.items() if k != "status"}, "'status' is required"),
        ({**good, "maps": good["maps"][:3]}, "has shape (3, 8, 8), expected (4, 8, 8)"),
        ({**good, "status": np.full(4, 255, np.uint8)}, "invalid code(s) [255]"),
        ({**good, "selected": np.full(4, 300)}, "outside int8"),
    ]
    for arrays, expected in cases:
        with pytest.raises(StoreError) as e:
            write_unit(path, read_layout(path), 0, arrays)
        assert expected in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StoreError, match="unit 3 out of range"):
        write_unit(path, read_layout(path), 3, good)
    assert done_units(path) == set()  # nothing half-written was marked done


def test_rewrite_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _make(path, n=10, unit=4, size=8)
    write_unit(path, read_layout(path), 1, _unit_data(1, 4, 8))
    first = _snapshot(path)
    write_unit(path, read_layout(path), 1, _unit_data(1, 4, 8))
    assert _snapshot(path) == first
    other = _unit_data(7, 4, 8, fail_first=False)  # a different attempt in between
    write_unit(path, read_layout(path), 1, other)
    assert _snapshot(path) != first
    write_unit(path, read_layout(path), 1, _unit_data(1, 4, 8))
    assert _snapshot(path) == first and done_units(path) == {1}


# ------------------------------------------------------------------------------ resume rules
def test_resume_mismatch_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _make(path)
    write_unit(path, read_layout(path), 0, _unit_data(0, 4, 8))
    g = _make(path)  # same layout + fingerprints: resumed, work kept
    assert done_units(path) == {0} and "resumed_at" in g.attrs
    with pytest.raises(StoreMismatchError) as e:
        _make(path, attrs=_attrs(manifest_fp="x" * 64))
    assert "manifest_fingerprint" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StoreMismatchError, match="config_fingerprint"):
        _make(path, attrs=_attrs(config_fp="y" * 64))
    with pytest.raises(StoreMismatchError, match="image_size"):
        _make(path, size=16)
    _make(path, size=16, overwrite=True)  # deletes the old store, markers included
    assert done_units(path) == set() and read_layout(path).image_size == (16, 16)
    # Never delete or write into something that is not a unioncam store.
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(StoreMismatchError, match="not a Zarr store"):
            _make(precious, overwrite=overwrite)
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w")
    with pytest.raises(StoreMismatchError, match="not a unioncam store"):
        _make(plain, overwrite=True)
    assert (precious / "thesis.tex").exists() and (plain / "zarr.json").exists()


def test_selection_score_array_and_resume_rules(tmp_path: Path) -> None:
    """``selection_score`` is always stored, naming its rule; another rule is another store."""
    path = tmp_path / "sel.zarr"
    g = _make(path, selection="insdel-8")
    assert g["selection_score"].attrs["rule"] == "insdel-8"
    assert g["selection_score"].metadata.dimension_names == ("image", "pool")
    data = _unit_data(0, 4, 8)
    data["selection_score"] = np.full((4, len(POOL)), -np.inf, dtype=np.float32)
    write_unit(path, read_layout(path), 0, data)
    assert np.isneginf(open_store(path)["selection_score"][:4]).all()
    with pytest.raises(StoreMismatchError, match="selection"):
        _make(path, selection="drop-20")  # another rule: another array's meaning
    beta = _make(tmp_path / "beta.zarr", selection="beta")
    assert beta["selection_score"].attrs["rule"] == "beta"
    assert read_layout(tmp_path / "beta.zarr").selection == "beta"


def _format_1_store(path: Path) -> None:
    """A store as unioncam 0.1 wrote it: layout format 1 with ``map_size``, array ``scores``."""
    g = zarr.open_group(str(path), mode="w", attributes={LAYOUT_ATTR: {
        "format": 1, "num_rows": 4, "unit_size": 4, "map_size": [8, 8], "pool": list(POOL),
        "components": [], "metrics": [], "selection": None,
    }})  # fmt: skip
    zarr.create_array(g.store, name="scores", shape=(4, len(POOL)), dtype="f4")


def test_a_format_1_store_is_refused_with_one_line(tmp_path: Path) -> None:
    old = tmp_path / "old.zarr"
    _format_1_store(old)
    want = (f"store {old} has format 1 (unioncam < 0.2); this unioncam reads format "
            f"{STORE_FORMAT}: re-run into a new store or pass --overwrite")  # fmt: skip
    for read in (open_store, read_layout, done_units_and_layout):
        with pytest.raises(StoreFormatError) as e:
            read(old)
        assert str(e.value) == want and "\n" not in str(e.value)
    with pytest.raises(StoreFormatError, match="has format 1"):  # resuming
        _make(old, n=4, unit=4)
    assert (old / "scores").exists()  # untouched
    g = _make(old, n=4, unit=4, overwrite=True)  # --overwrite replaces it
    assert "beta" in g and read_layout(old).format == STORE_FORMAT


def done_units_and_layout(path: Path):
    """What a reader does: open the store through the one StoreReader."""
    from pipeline.analysis.reader import open_reader

    return open_reader(str(path))


# ------------------------------------------------------------------------------ readers
def test_xarray_and_finalize(tmp_path: Path) -> None:
    import xarray as xr

    path = tmp_path / "s.zarr"
    _make(path, n=10, unit=4, size=8, components=("region:scorecam",))
    for u, rows in ((0, 4), (2, 2)):
        data = _unit_data(u, rows, 8)
        data["components/region:scorecam"] = data["maps"] * 0.5
        write_unit(path, read_layout(path), u, data)
    ds = xr.open_zarr(str(path), consolidated=False)
    assert ds.maps.dims == ("image", "y", "x") and ds.maps.dtype == np.float16
    assert ds.beta.dims == ("image", "pool") and list(ds.pool.values) == list(POOL)
    assert ds.status.dtype == np.uint8 and list(ds.status.values[4:8]) == [255] * 4
    np.testing.assert_array_equal(
        ds.maps.values[1:4], _unit_data(0, 4, 8)["maps"][1:4].astype(np.float16)
    )
    assert float(ds.beta.sel(pool="region:groupcam").isel(image=9)) == pytest.approx(
        float(_unit_data(2, 2, 8)["beta"][1, 1])
    )
    summary = finalize_store(path, summary={"wall_seconds": 3.2})
    assert summary["rows_by_status"] == {"OK": 4, "TRUNCATED": 2, "PENDING": 4}
    assert (summary["units_done"], summary["complete"]) == (2, False)
    root = json.loads((path / "zarr.json").read_text())
    assert "consolidated_metadata" in root
    ds2 = xr.open_zarr(str(path), consolidated=True)
    assert ds2.maps.dims == ("image", "y", "x") and ds2.attrs["summary"]["wall_seconds"] == 3.2
    assert set(ds2.data_vars) >= {"maps", "beta", "status", "error", "crop_box"}
    comp = xr.open_zarr(str(path), group="components", consolidated=False)
    np.testing.assert_array_equal(comp["region_scorecam"].values[9], ds2.maps.values[9] * 0.5)
    g = open_store(path)
    assert g.attrs[LAYOUT_ATTR]["pool"] == list(POOL)
    assert done_units(path) == {0, 2}  # markers, not the (stale) consolidated metadata
    with pytest.raises(StoreError, match="no unioncam store"):
        open_store(tmp_path / "nothing.zarr")
    # Resuming drops the consolidated snapshot (it would go stale while workers write);
    # the next finalize writes a fresh one.
    _make(path, n=10, unit=4, size=8, components=("region:scorecam",))
    assert json.loads((path / "zarr.json").read_text()).get("consolidated_metadata") is None
    assert xr.open_zarr(str(path), consolidated=False).maps.shape == (10, 8, 8)


# ------------------------------------------------------------------------------ processes
def _write_one_unit(path: str, u: int, barrier) -> None:
    barrier.wait(timeout=60)  # both processes write at the same moment
    write_unit(path, read_layout(path), u, _unit_data(u, 64, 32))


def test_two_processes_write_units_in_parallel(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _make(path, n=128, unit=64, size=32)
    ctx = mp.get_context("spawn")  # never fork a process that has used zarr
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_one_unit, args=(str(path), u, barrier)) for u in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert done_units(path) == {0, 1}
    g = zarr.open_group(str(path), mode="r")
    for u in (0, 1):
        _check_unit(g, u, 64, 128, 32)
    assert int((g["status"][:] == 255).sum()) == 0


# ------------------------------------------------------------------------------ S3
@pytest.fixture(scope="module")
def s3():
    from s3server import S3Server

    with S3Server() as server:
        yield server


def test_s3_end_to_end(s3, tmp_path: Path, sample_dir: Path) -> None:
    """Images, manifest and store all on S3 (moto on loopback, via s3fs/FsspecStore)."""
    import xarray as xr

    from pipeline.data.build import build_from_list
    from pipeline.data.decode import decode_image, read_bytes
    from pipeline.data.manifest import Manifest

    bucket = s3.make_bucket()
    so = s3.storage_options
    fs = s3.filesystem()
    files = sorted(sample_dir.glob("*.JPEG"))[:5]
    uris = []
    for f in files:
        fs.pipe_file(f"{bucket}/images/{f.name}", f.read_bytes())
        uris.append(f"{bucket}/images/{f.name}")
    uris.append(f"{bucket}/images/missing.JPEG")
    m = build_from_list(uris, f"{bucket}/manifest.parquet", unit_size=4, storage_options=so)
    m = Manifest.open(f"{bucket}/manifest.parquet", storage_options=so)
    assert (m.num_rows, m.num_units) == (6, 2)
    store = f"{bucket}/runs/store.zarr"
    create_store(store, StoreLayout(num_rows=m.num_rows, unit_size=m.unit_size, image_size=16, pool=POOL), attrs=_attrs(manifest_fp=m.fingerprint), storage_options=so)  # fmt: skip
    for u in range(m.num_units):
        rows = m.read_unit(u)
        data = _unit_data(u, len(rows), 16, fail_first=False)
        for i, row in enumerate(rows):
            try:
                img = decode_image(read_bytes(row.uri, so), uri=row.uri)
            except Exception as exc:
                data["status"][i], data["error"][i] = exc.status, exc.message
                data["maps"][i] = np.nan
                continue
            small = np.asarray(img.convert("L").resize((16, 16)), np.float32) / 255.0
            data["maps"][i] = small
            data["orig_size"][i] = (img.height, img.width)
        write_unit(store, read_layout(store, storage_options=so), u, data, storage_options=so)
    assert done_units(store, storage_options=so) == {0, 1}
    # A second client (as a resuming driver would be) sees the same markers.
    create_store(store, StoreLayout(num_rows=6, unit_size=4, image_size=16, pool=POOL), attrs=_attrs(manifest_fp=m.fingerprint), storage_options=so)  # fmt: skip
    assert done_units(store, storage_options=so) == {0, 1}
    summary = finalize_store(store, storage_options=so)
    assert summary["rows_by_status"] == {"OK": 5, "MISSING": 1} and summary["complete"]
    ds = xr.open_zarr(store, storage_options=so, consolidated=True)
    assert ds.maps.dims == ("image", "y", "x")
    assert "missing.JPEG" in str(ds.error.values[5]) and int(ds.status.values[5]) == 1
    first = np.asarray(decode_image(files[0].read_bytes()).convert("L").resize((16, 16)))
    np.testing.assert_allclose(ds.maps.values[0], first / 255.0, atol=1e-3)
    assert tuple(ds.orig_size.values[0]) == (375, 500)
    # Nothing stored on S3 mentions the (dummy) credentials.
    for key in fs.find(store):
        body = fs.cat_file(key)
        assert SECRET.encode() not in body and b'"testing"' not in body, key
