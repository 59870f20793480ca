"""Store format 4: the layout travels, maps in multi-row chunks, the map size, the old format.

What these protect: a worker writes units from the layout it was handed (never reading the
store's metadata back), maps read back exactly as written (float16) at any chunking, a
smaller ``map_size`` stays within the stated deviation of the network-input map on real
photos, and a format-3 store is refused with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.decode import Status
from pipeline.run.rows import null_maps, stored_maps
from pipeline.store.io import create_store, open_store, read_layout
from pipeline.store.layout import (
    MAP_CHUNK_BYTES,
    STORE_FORMAT,
    StoreError,
    StoreFormatError,
    StoreLayout,
    map_chunk_rows,
)
from pipeline.store.units import UnitWriter

POOL = ("region:scorecam", "region:groupcam", "fused:denoised+scorecam")


def _unit(layout: StoreLayout, u: int) -> dict[str, np.ndarray]:
    start, stop = layout.unit_range(u)
    a = layout.empty_rows(stop - start)
    a["maps"] = null_maps(u, stop - start, layout.map_size)
    a["status"] = np.zeros(stop - start, np.uint8)
    a["target"] = np.arange(start, stop) % 1000
    return a


def test_map_chunk_rule() -> None:
    # ~2 MiB of float16 per inner chunk, a divisor of the unit, at most 128 rows.
    assert map_chunk_rows(1024, (224, 224)) == 16
    assert map_chunk_rows(1024, (56, 56)) == 128
    assert map_chunk_rows(1000, (224, 224)) == 20  # 2 MiB / 98 KiB = 20.9 rows
    assert map_chunk_rows(1001, (224, 224)) == 13  # 7 x 11 x 13: largest divisor <= 20
    assert map_chunk_rows(7, (8, 8)) == 7
    for unit, side in ((1024, 224), (1000, 112), (333, 56), (5, 500)):
        k = map_chunk_rows(unit, (side, side))
        assert unit % k == 0 and (k == 1 or 2 * k * side * side <= MAP_CHUNK_BYTES)
    with pytest.raises(StoreError, match="map_chunk must divide"):
        StoreLayout(num_rows=10, unit_size=4, image_size=8, pool=POOL, map_chunk=3)
    with pytest.raises(StoreError, match="map_size must be positive and at most"):
        StoreLayout(num_rows=10, unit_size=4, image_size=8, pool=POOL, map_size=16)
    with pytest.raises(StoreError, match="map codec"):
        StoreLayout(num_rows=10, unit_size=4, image_size=8, pool=POOL, map_codec="gzip:3")


@pytest.mark.parametrize("side,unit", [(224, 64), (56, 100)])
def test_maps_read_back_exactly_as_written(tmp_path: Path, side: int, unit: int) -> None:
    layout = StoreLayout(num_rows=3 * unit - 7, unit_size=unit, image_size=side, pool=POOL)
    path = tmp_path / "s.zarr"
    create_store(path, layout)
    g = open_store(path)
    assert g["maps"].chunks == (layout.map_chunk, side, side)
    assert g["maps"].shards == (unit, side, side) and layout.map_chunk > 1
    writer = UnitWriter(path, layout)
    written = {u: _unit(layout, u) for u in range(layout.num_units)}
    for u, a in written.items():
        writer.write(u, a)
    for u, a in written.items():
        s, e = layout.unit_range(u)
        back = np.asarray(open_store(path)["maps"][s:e])
        assert back.dtype == np.float16
        np.testing.assert_array_equal(back, a["maps"].astype(np.float16))
        # one row (a query, an overlay) reads the same values
        np.testing.assert_array_equal(np.asarray(g["maps"][s + 1]), back[1])


def test_the_writer_reads_no_metadata(tmp_path: Path) -> None:
    """With every array's zarr.json replaced by garbage after creation, a writer made from
    the layout still writes whole units that read back once the metadata is restored."""
    layout = StoreLayout(num_rows=20, unit_size=8, image_size=16, pool=POOL,
                         metrics=("insertion",), components=("region:scorecam",))  # fmt: skip
    path = tmp_path / "s.zarr"
    create_store(path, layout)
    metas = [p for p in path.rglob("zarr.json") if p.parent != path]
    saved = {p: p.read_bytes() for p in metas}
    (path / "zarr.json").rename(path / "root.json.bak")
    for p in metas:
        p.write_text("not json")
    writer = UnitWriter(path, layout)
    units = {u: _unit(layout, u) for u in range(layout.num_units)}
    for u, a in units.items():
        writer.write(u, a)
    for p, body in saved.items():
        p.write_bytes(body)
    (path / "root.json.bak").rename(path / "zarr.json")
    g = open_store(path)
    for u, a in units.items():
        s, e = layout.unit_range(u)
        np.testing.assert_array_equal(np.asarray(g["maps"][s:e]), a["maps"].astype(np.float16))
        np.testing.assert_array_equal(np.asarray(g["target"][s:e]), a["target"])
        assert (np.asarray(g["status"][s:e]) == int(Status.OK)).all()
        assert np.isnan(np.asarray(g["components/region_scorecam"][s:e])).all()
    markers = sorted(p.parent.name for p in (path / "markers").glob("unit-*/zarr.json"))
    assert markers == ["unit-000000", "unit-000001", "unit-000002"]


def test_a_smaller_map_size_is_within_the_stated_deviation(effnet, sample_dir, sample_labels):
    """docs/store.md states the deviation of ``--map-size 56`` against the network-input map
    (upsampled back bilinearly, as an overlay shows it), measured on real photos with
    Grad-CAM at the default layer and at ``_blocks.15``: checked here."""
    from conftest import PHOTO_ROWS, load_batch

    from unioncam import make_cam

    x, _ = load_batch(effnet, sample_dir, sample_labels, PHOTO_ROWS, 224)
    for layer in ("_swish", "_blocks.15"):
        with make_cam("gradcam", effnet.model.eval(), layer) as cam:
            maps = cam(x).maps
        small = torch.from_numpy(stored_maps(maps, (56, 56)))
        assert small.shape == (len(x), 56, 56)
        up = F.interpolate(small[:, None], size=(224, 224), mode="bilinear",
                           align_corners=False)[:, 0]  # fmt: skip
        d = (up - maps.float()).abs()
        assert d.mean() < 0.002 and d.max() < 0.06, (layer, d.mean().item(), d.max().item())
    # and a full-size store is exactly the library's map (float16)
    np.testing.assert_array_equal(stored_maps(maps, (224, 224)), maps.float().numpy())


def test_a_format_3_store_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "old.zarr"
    layout = StoreLayout(num_rows=8, unit_size=4, image_size=8, pool=POOL)
    create_store(path, layout)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["unioncam_store"]["format"] = 3
    (path / "zarr.json").write_text(json.dumps(meta))
    want = (f"store {path} has format 3 (unioncam 0.3); this unioncam reads format "
            f"{STORE_FORMAT}: re-run into a new store or pass --overwrite")  # fmt: skip
    for read in (open_store, read_layout):
        with pytest.raises(StoreFormatError) as e:
            read(path)
        assert str(e.value) == want


def test_a_store_with_small_maps_is_analysed_at_its_map_size(tmp_path: Path) -> None:
    """Thumbnails and descriptors follow the stored map side (16 px here, under the
    analysis's 32-px thumbnail side), not the network input's."""
    from pipeline.analysis.reader import open_reader
    from pipeline.analysis.store_analysis import AnalysisConfig, analyze

    layout = StoreLayout(num_rows=24, unit_size=8, image_size=64, map_size=16, pool=POOL)
    path = tmp_path / "s.zarr"
    create_store(path, layout, attrs={"manifest_fingerprint": "m", "config_fingerprint": "c"})
    writer = UnitWriter(path, layout)
    for u in range(layout.num_units):
        a = _unit(layout, u)
        a["selected"] = np.zeros(8, np.int8)
        writer.write(u, a)
    assert open_store(path)["maps"].shape == (24, 16, 16)
    s = analyze(str(path), config=AnalysisConfig(groups="class"), parallel=False)
    assert s.rows_described == 24
    rows = open_reader(str(path)).analysis().rows
    thumbs = np.asarray(rows["thumbs"][:])
    assert thumbs.shape == (24, 16, 16) and np.isfinite(thumbs).all()
