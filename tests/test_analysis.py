"""Dataset analysis (issue 15): descriptors, strategies, the ``analysis`` group, comparison.

The stores here are real Zarr stores written through the store's own API
(``create_store`` + ``write_unit``, the calls a worker makes) with maps made to order:
planted strategies need maps whose truth is known. Descriptors are checked on real
UnionCAM maps of the suite's photos against a pixel-by-pixel reading of their definitions.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.analysis.compare import compare_maps
from pipeline.analysis.descriptors import DESCRIPTORS, describe, thumbnails
from pipeline.analysis.groups import IMAGENET_GROUPS, load_grouping, wordnet_groups
from pipeline.analysis.reader import open_reader
from pipeline.analysis.store_analysis import AnalysisConfig, analyze
from pipeline.analysis.strategies import adjusted_rand_index, find_strategies, silhouette
from pipeline.cli import main
from pipeline.data.decode import Status
from pipeline.store.io import create_store, finalize_store, read_layout
from pipeline.store.layout import StoreLayout
from pipeline.store.lease import drop_from_consolidated, read_lease
from pipeline.store.units import write_unit

S = 32  # map side of the synthetic stores
UNIT = 16
POOL = ("gradient:denoised", "region:groupcam")


# ---------------------------------------------------------------------------------------
# descriptors
def _brute_force(m: np.ndarray) -> dict[str, float]:
    """The descriptors by their definitions, one pixel at a time."""
    h, w = m.shape
    m = np.clip(m.astype(np.float64), 0, 1)
    total = sum(m[i, j] for i in range(h) for j in range(w))
    cy = sum(m[i, j] * (i + 0.5) / h for i in range(h) for j in range(w)) / total
    cx = sum(m[i, j] * (j + 0.5) / w for i in range(h) for j in range(w)) / total
    var = sum(m[i, j] * (((i + 0.5) / h - cy) ** 2 + ((j + 0.5) / w - cx) ** 2)
              for i in range(h) for j in range(w)) / total  # fmt: skip
    ent = -sum((m[i, j] / total) * math.log(m[i, j] / total)
               for i in range(h) for j in range(w) if m[i, j] > 0) / math.log(h * w)  # fmt: skip
    centre = sum(m[i, j] for i in range(h) for j in range(w)
                 if 0.25 <= (i + 0.5) / h < 0.75 and 0.25 <= (j + 0.5) / w < 0.75) / total
    border = sum(m[i, j] for i in range(h) for j in range(w)
                 if min((i + 0.5) / h, (j + 0.5) / w) < 0.1
                 or max((i + 0.5) / h, (j + 0.5) / w) >= 0.9) / total  # fmt: skip
    area = sum(1 for i in range(h) for j in range(w) if m[i, j] >= 0.5) / (h * w)
    return {"centre_y": cy, "centre_x": cx, "spread": math.sqrt(var), "area": area,
            "entropy": ent, "centre_bias": centre, "border": border}  # fmt: skip


@pytest.fixture(scope="module")
def real_maps(effnet, photos):
    """Grad-CAM maps of the six suite photos at 96 px, float16 as a store holds them (one
    forward and backward: UnionCAM's masked forwards would add a minute on 2 busy cores;
    descriptors read any method's maps)."""
    from unioncam.gradient import GradCAM

    x, _ = photos
    with GradCAM(effnet.model, "_blocks.4") as cam:
        res = cam(x)
    return res.maps.detach().cpu().numpy().astype(np.float16)


def test_descriptors_match_brute_force_on_real_maps(real_maps):
    got, valid = describe(real_maps)
    assert got.shape == (len(real_maps), len(DESCRIPTORS))
    flat = real_maps.reshape(len(real_maps), -1).max(1) == 0
    assert (valid == ~flat).all() and valid.sum() >= 4
    for m, row in zip(real_maps[valid], got[valid], strict=True):
        want = _brute_force(m.astype(np.float64))
        for j, name in enumerate(DESCRIPTORS):
            assert row[j] == pytest.approx(want[name], abs=2e-5), name


def test_descriptors_of_known_maps_and_invalid_maps():
    uniform = np.ones((1, 20, 20))
    d, _ = describe(uniform)
    assert d[0, DESCRIPTORS.index("centre_bias")] == pytest.approx(0.25)
    assert d[0, DESCRIPTORS.index("border")] == pytest.approx(0.36)
    assert d[0, DESCRIPTORS.index("entropy")] == pytest.approx(1.0)
    point = np.zeros((1, 20, 20))
    point[0, 0, 19] = 1.0
    d, _ = describe(point)
    assert d[0, DESCRIPTORS.index("spread")] == pytest.approx(0.0, abs=1e-6)
    assert (d[0, 0], d[0, 1]) == pytest.approx((0.025, 0.975))
    assert d[0, DESCRIPTORS.index("border")] == pytest.approx(1.0)
    bad = np.stack([np.zeros((20, 20)), np.full((20, 20), np.nan), uniform[0]])
    d, valid = describe(bad)
    assert valid.tolist() == [False, False, True]
    assert np.isnan(d[:2]).all() and np.isfinite(d[2]).all()


def test_ari_and_silhouette_match_scikit_learn_values():
    # values from scikit-learn 1.9.1 (adjusted_rand_score, silhouette_score) on these inputs
    a = [0, 0, 1, 1, 2, 2, 2]
    b = [1, 1, 0, 0, 0, 2, 2]
    assert adjusted_rand_index(a, b) == pytest.approx(0.475)
    assert adjusted_rand_index(a, a) == 1.0
    x = np.array([[0, 0], [0, 1], [5, 5], [5, 6], [9, 0]], float)
    assert silhouette(x, np.array([0, 0, 1, 1, 1])) == pytest.approx(0.5771984391033371)


# ---------------------------------------------------------------------------------------
# synthetic stores with planted strategies
_YY, _XX = np.mgrid[0:S, 0:S] / S


def _pattern(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A noisy map of a known pattern: an object-centred blob or a corner patch."""
    cy, cx, s = {"centre": (0.5, 0.5, 0.15), "corner": (0.1, 0.9, 0.07),
                 "left": (0.5, 0.25, 0.12)}[kind]  # fmt: skip
    cy, cx = cy + rng.normal(0, 0.03), cx + rng.normal(0, 0.03)
    m = np.exp(-((_YY - cy) ** 2 + (_XX - cx) ** 2) / (2 * (s * rng.uniform(0.8, 1.2)) ** 2))
    m = m + rng.uniform(0, 0.15, m.shape)
    return ((m - m.min()) / (m.max() - m.min())).astype(np.float32)


#: class -> (patterns, counts): class 7 has two strategies (70 % centre, 30 % corner)
PLANTED = {7: (("centre", "corner"), (56, 24)), 8: (("centre",), (48,)), 9: (("left",), (32,))}
BAD_MAP_ROW, FAILED_ROW = 5, 9  # an OK row whose map is NaN, a row that failed to decode


def _planted_rows(seed: int = 0):
    rng = np.random.default_rng(seed)
    items = [(c, kind) for c, (kinds, counts) in PLANTED.items()
             for kind, n in zip(kinds, counts, strict=True) for _ in range(n)]  # fmt: skip
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    maps = np.stack([_pattern(kind, rng) for _, kind in items])
    target = np.array([c for c, _ in items], dtype=np.int32)
    truth = np.array([kind for _, kind in items])
    return maps, target, truth


def write_store(path: Path, maps: np.ndarray, target: np.ndarray, units: list[int] | None = None,
                *, bad: bool = True, attrs: dict | None = None,
                sizes: np.ndarray | None = None) -> Path:  # fmt: skip
    """A real store (the worker's write calls) holding ``maps``; ``units`` = which to write;
    ``sizes``: the photos' (h, w), whose whole frame is then the crop box."""
    n = len(maps)
    create_store(path, StoreLayout(num_rows=n, unit_size=UNIT, image_size=S, pool=POOL), attrs={"manifest_fingerprint": "planted", "config_fingerprint": "c",
                        **(attrs or {})})  # fmt: skip
    extra: dict[str, np.ndarray] = {}
    if sizes is not None:
        extra["orig_size"] = np.asarray(sizes, dtype=np.int32)
        extra["crop_box"] = np.stack([np.zeros(n), np.zeros(n), sizes[:, 1], sizes[:, 0]],
                                     1).astype(np.int32)  # fmt: skip
    status = np.full(n, int(Status.OK), dtype=np.uint8)
    maps = maps.copy()
    if bad:
        maps[BAD_MAP_ROW] = np.nan
        status[FAILED_ROW] = int(Status.CORRUPT)
        maps[FAILED_ROW] = np.nan
    nu = -(-n // UNIT)
    for u in range(nu) if units is None else units:
        s, e = u * UNIT, min(n, (u + 1) * UNIT)
        write_unit(path, read_layout(path), u, {"maps": maps[s:e], "status": status[s:e], "target": target[s:e],
                             "label": target[s:e], **{k: v[s:e] for k, v in extra.items()},
                             # a UnionCAM row that has a map has a selected member
                             "selected": np.where(status[s:e] == 0, 0, -1),
                             **({"error": np.where(status[s:e] == 0, "", "planted failure")}
                                if bad else {})})  # fmt: skip
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    maps, target, truth = _planted_rows()
    path = write_store(tmp_path_factory.mktemp("planted") / "s.zarr", maps, target)
    summary = analyze(str(path), config=AnalysisConfig(groups="class"), parallel=False)
    return {"path": path, "maps": maps, "target": target, "truth": truth, "summary": summary}


def test_planted_strategies_are_recovered_and_ranked_first(planted):
    r = open_reader(str(planted["path"]))
    a = r.analysis()
    assert a is not None and a.complete
    strategy = np.asarray(a.rows["strategy"][:])
    target, truth = planted["target"], planted["truth"]
    ok = np.ones(len(target), bool)
    ok[[BAD_MAP_ROW, FAILED_ROW]] = False
    two = ok & (target == 7)
    assert adjusted_rand_index(truth[two], strategy[two]) >= 0.9
    st = a.strategies("7")
    assert st.k == 2 and st.silhouette >= 0.5
    assert sorted(st.sizes, reverse=True) == st.sizes and st.sizes[1] in (23, 24)
    # the minority is the corner patch: its centroid's mass sits top right
    def top_right(c: np.ndarray) -> float:
        return float(c[: c.shape[0] // 3, -c.shape[1] // 3:].sum() / c.sum())

    assert top_right(st.centroids[1]) > 0.25 > 0.1 > top_right(st.centroids[0])
    assert all(truth[r] == "corner" for r in st.exemplars[1])
    # one pattern each: not split
    assert a.strategies("8").k == 1 and a.strategies("9").k == 1
    ranking = a.clever_hans_ranking()
    assert ranking[0][0] == "7" and ranking[0][1] > 0.3
    assert ranking[1][1] == 0.0


def test_bad_and_failed_rows_are_skipped_and_counted(planted):
    s = planted["summary"]
    assert (s.rows_bad_map, s.rows_no_map) == (1, 1)
    assert s.rows_described == len(planted["target"]) - 2
    a = open_reader(str(planted["path"])).analysis()
    described = np.asarray(a.rows["described"][:])
    assert described[BAD_MAP_ROW] == 2 and described[FAILED_ROW] == 0
    assert np.isnan(a.rows["centre_bias"][BAD_MAP_ROW])
    table = {row["class"]: row for row in a.class_table()}
    n7 = int((planted["target"] == 7).sum()) - int(planted["target"][BAD_MAP_ROW] == 7) - \
        int(planted["target"][FAILED_ROW] == 7)  # fmt: skip
    assert table[7]["count"] == n7
    # class 9 looks left of centre; class 8 at the centre (the noise floor pulls both to 0.5)
    assert table[9]["centre_x"] < 0.42 < 0.48 < table[8]["centre_x"]
    assert table[8]["centre_bias"] > table[9]["centre_bias"]


def test_analysis_group_is_xarray_readable_with_provenance(planted):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(planted["path"]), group="analysis/rows")
    assert ds["centre_bias"].dims == ("image",) and ds["thumbs"].dims == ("image", "ty", "tx")
    assert ds.sizes["image"] == len(planted["target"])
    groups = xr.open_zarr(str(planted["path"]), group="analysis/groups")
    assert groups["centroids"].dims == ("group", "strategy", "cy", "cx")
    attrs = dict(zarr.open_group(str(planted["path"]), path="analysis", mode="r",
                                 use_consolidated=False).attrs)  # fmt: skip
    assert attrs["source"]["manifest_fingerprint"] == "planted"
    assert attrs["params"]["groups"] == "class" and attrs["complete"] is True


def test_analyze_refreshes_the_consolidated_metadata_so_plain_xarray_opens_every_group(
    tmp_path,
):
    """A finished run leaves a consolidated snapshot without ``analysis``; after analyze
    every group opens with plain ``xr.open_zarr`` (no fallback warning, no KeyError)."""
    import warnings

    xr = pytest.importorskip("xarray")
    maps, target, _ = _planted_rows(seed=2)
    path = write_store(tmp_path / "s.zarr", maps, target)
    finalize_store(str(path))  # what the driver does at the end of a run
    drop_from_consolidated(str(path))
    with pytest.raises(KeyError, match="analysis"):
        zarr.open_group(str(path), mode="r")["analysis"]  # nothing analysed yet
    analyze(str(path), config=AnalysisConfig(groups="class"), parallel=False)
    assert read_lease(str(path)) is None  # analyze held the lease and released it
    import json

    meta = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    assert "analysis/rows" in meta and "analysis/rows/centre_bias" in meta
    assert "lease" not in meta
    assert not any(k.startswith("markers/") for k in meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # xarray warns when it falls back to unconsolidated
        for group, dim in [(None, "image"), ("analysis/rows", "image"),
                           ("analysis/classes", "class"), ("analysis/groups", "group")]:
            ds = xr.open_zarr(str(path), group=group)
            assert dim in ds.dims, (group, ds.dims)
        rows = xr.open_zarr(str(path), group="analysis/rows")
    described = rows["described"].values
    np.testing.assert_array_equal(described, open_reader(str(path)).analysis().rows["described"][:])
    assert (described == 1).sum() == len(maps) - 2  # all but the bad map and the failed row


def test_analysis_during_a_run_covers_finished_units_and_updates(tmp_path):
    maps, target, _ = _planted_rows(seed=1)
    path = write_store(tmp_path / "s.zarr", maps, target, units=[0, 2])
    first = analyze(str(path), config=AnalysisConfig(groups="class"), parallel=False)
    assert (first.units, first.units_added, first.recomputed) == (2, 2, True)
    a = open_reader(str(path)).analysis()
    assert not a.complete
    described = np.asarray(a.rows["described"][:])
    assert (described[UNIT : 2 * UNIT] == 255).all()  # unit 1 has no marker yet
    assert sum(row["count"] for row in a.class_table()) == first.rows_described
    # the run finishes the other units; a rerun describes only those and recomputes
    nu = -(-len(maps) // UNIT)
    write_store(tmp_path / "s.zarr", maps, target, units=[u for u in range(nu) if u not in (0, 2)])
    second = analyze(str(path), config=AnalysisConfig(groups="class"), parallel=False)
    assert (second.units, second.units_added, second.recomputed) == (nu, nu - 2, True)
    assert second.rows_described == len(maps) - 2
    a = open_reader(str(path)).analysis()
    assert a.complete and (np.asarray(a.rows["described"][:]) != 255).all()
    third = analyze(str(path), config=AnalysisConfig(groups="class"), parallel=False)
    assert (third.units_added, third.recomputed) == (0, False)
    # other parameters: recomputed from scratch
    fourth = analyze(str(path), config=AnalysisConfig(groups="class", thumb_side=16),
                     parallel=False)  # fmt: skip
    assert fourth.recomputed and fourth.units_added == nu


def test_a_corrupt_shard_is_counted_not_a_crash(tmp_path):
    maps, target, _ = _planted_rows(seed=2)
    path = write_store(tmp_path / "s.zarr", maps, target, bad=False)
    shard = path / "maps" / "c" / "1" / "0" / "0"
    assert shard.is_file()
    shard.write_bytes(b"not a shard" * 10)
    s = analyze(str(path), config=AnalysisConfig(groups="class"), parallel=False)
    assert s.rows_bad_map == UNIT and s.rows_described == len(maps) - UNIT


def test_grouping_file_and_the_shipped_imagenet_grouping(tmp_path):
    f = tmp_path / "groups.csv"
    f.write_text("class_index,group\n7,odd\n8,plain\n9,plain\n")
    g = load_grouping(f)
    assert [g.group_of(c) for c in (7, 8, 9, 10)] == ["odd", "plain", "plain", "other"]
    imagenet = load_grouping("imagenet")
    assert len(imagenet.mapping) == 1000
    assert {imagenet.group_of(c) for c in range(151, 269)} == {"dog"}
    assert imagenet.group_of(281) == "feline" and imagenet.group_of(0) == "fish"
    bad = tmp_path / "bad.csv"
    bad.write_text("class_index,group\n1,a\n1,b\n")
    with pytest.raises(ValueError, match="two groups"):
        load_grouping(bad)


@pytest.mark.skipif(not os.path.isfile("/usr/share/wordnet/data.noun"),
                    reason="WordNet 3.0 (Debian package wordnet-base) is not installed")
def test_shipped_grouping_is_what_wordnet_gives():
    with open(IMAGENET_GROUPS, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert wordnet_groups([r["synset"] for r in rows]) == [r["group"] for r in rows]


def test_groups_from_a_file_pool_classes(planted, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(planted["path"], path)
    f = tmp_path / "groups.csv"
    f.write_text("class_index,group\n7,odd\n8,plain\n9,plain\n")
    analyze(str(path), config=AnalysisConfig(groups=str(f)), parallel=False)
    a = open_reader(str(path)).analysis()
    assert a.group_names() == ["odd", "plain"]
    plain = a.strategies("plain")
    assert plain.k == 2 and sorted(plain.classes) == [8, 9]  # centre vs left
    assert a.group_of_class(7) == "odd"


# ---------------------------------------------------------------------------------------
# comparison
def test_compare_maps_values():
    rng = np.random.default_rng(0)
    a = rng.random((3, 20, 20))
    rho, iou = compare_maps(a, a)
    assert np.allclose(rho, 1) and np.allclose(iou, 1)
    rho, iou = compare_maps(a, 1 - a)
    assert np.allclose(rho, -1) and np.allclose(iou, 0)
    rho, _ = compare_maps(a, np.full_like(a, 0.5))  # a constant map has no ranks
    assert np.isnan(rho).all()


def test_compare_self_is_perfect_and_a_shifted_copy_is_less(planted, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(planted["path"], path)
    analyze(str(path), compare=str(path), parallel=False)
    a = open_reader(str(path)).analysis()
    computed = a.compare["spearman"].metadata.to_dict()
    stamp = os.stat(path / "analysis" / "compare" / "spearman" / "zarr.json").st_mtime_ns
    analyze(str(path), compare=str(path), parallel=False)  # unchanged: not recomputed
    assert os.stat(path / "analysis" / "compare" / "spearman" / "zarr.json").st_mtime_ns == stamp
    assert computed["dimension_names"] == ("image",)
    rho = np.asarray(a.compare["spearman"][:])
    ok = np.isfinite(rho)
    assert ok.sum() == len(rho) - 2 and np.allclose(rho[ok], 1.0)
    assert np.allclose(np.asarray(a.compare["top_iou"][:])[ok], 1.0)
    shifted = write_store(tmp_path / "shifted.zarr", np.roll(planted["maps"], 6, axis=2),
                          planted["target"])  # fmt: skip
    analyze(str(path), compare=str(shifted), parallel=False)
    a = open_reader(str(path)).analysis()
    table = a.class_table()
    assert all(row["spearman"] < 0.9 and row["top_iou"] < 0.9 for row in table)
    assert a.compare.attrs["other"] == str(shifted)


# ---------------------------------------------------------------------------------------
# command line
def test_analyze_and_query_cli(planted, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    shutil.copytree(planted["path"], path)
    assert main(["analyze", str(path), "--groups", "class"]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "Clever-Hans candidates" in out and "7: " in out
    assert main(["query", str(path), "classes", "--by", "centre_bias"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "centre_bias" in lines[0]
    assert lines[1].split()[0] == "8" and lines[-1].split()[0] == "9"  # most central first
    assert main(["query", str(path), "strategies", "--class", "7"]) == 0
    out = capsys.readouterr().out
    assert "2 strategies" in out and "clever-hans" in out.lower()
    assert main(["query", str(path), "classes", "--by", "nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_thumbnails_are_unit_norm_area_means():
    m = np.zeros((1, 8, 8))
    m[0, :4, :4] = 1.0
    t = thumbnails(m, 2)
    assert t[0, 0, 0] == pytest.approx(1.0) and t[0, 1, 1] == 0.0
    st = find_strategies(np.repeat(t, 3, 0))
    assert st.k == 1


# ---------------------------------------------------------------------------------------
# localisation against boxes
def test_a_map_inside_a_box_scores_one_and_boxes_outside_the_crop_count_outside(tmp_path):
    from pipeline.analysis.boxes import box_mask, localisation

    crop = (100, 50, 300, 250)  # 200 x 200 original pixels -> a 10 x 10 map, 20 px per pixel
    inside = box_mask(crop, [(120, 70, 220, 170)], 10, 10)  # map pixels 1..5 x 1..5
    assert inside.sum() == 25 and inside[1:6, 1:6].all()
    m = np.zeros((10, 10))
    m[2:5, 2:5] = 1.0
    energy, peak, iou = localisation(m[None], inside[None], np.array([True]))[0]
    assert (energy, peak) == (1.0, 1.0) and iou == pytest.approx(9 / 25)
    # a box partly outside the crop: only its part inside the crop covers pixels
    part = box_mask(crop, [(250, 0, 400, 100)], 10, 10)
    assert part.sum() == 6 and part[:2, 7:].all()
    assert box_mask(crop, [(0, 0, 90, 40)], 10, 10).sum() == 0  # wholly outside
    energy, peak, _ = localisation(m[None], part[None], np.array([True]))[0]
    assert (energy, peak) == (0.0, 0.0)
    assert np.isnan(localisation(m[None], part[None], np.array([False]))).all()


def test_boxes_files_in_both_formats(tmp_path):
    from pipeline.analysis.boxes import load_boxes, match_rows

    loc = tmp_path / "LOC_val_solution.csv"
    loc.write_text("ImageId,PredictionString\n"
                   "ILSVRC2012_val_00000001,n01751748 111 108 441 375 n01751748 1 2 3 4 \n"
                   "ILSVRC2012_val_00000002,n09193705 31 26 463 270 \n")  # fmt: skip
    synsets = [ln.split("\t")[0] for ln in
               (Path(IMAGENET_GROUPS).parent / "imagenet_classes.txt").read_text().splitlines()
               if ln and not ln.startswith("#")]  # fmt: skip
    b = load_boxes(loc, synsets)
    assert b["ILSVRC2012_val_00000001"] == [(65, 111, 108, 441, 375), (65, 1, 2, 3, 4)]
    rows = match_rows(["/data/val/ILSVRC2012_val_00000001.JPEG",
                       "s3://b/ILSVRC2012_val_00000002.JPEG", "/x/other.jpg"], [65, 3, 1], b)
    assert rows == [[(111, 108, 441, 375), (1, 2, 3, 4)], [], []]  # row 2: label is not 970
    generic = tmp_path / "boxes.csv"
    generic.write_text("uri,class,x1,y1,x2,y2\n/p/a.jpg,,0,0,10,10\n/p/a.jpg,,5,5,20,20\n")
    g = load_boxes(generic)
    assert match_rows(["a.jpg"], [-1], g) == [[(0, 0, 10, 10), (5, 5, 20, 20)]]
    with pytest.raises(ValueError, match="expected LOC_val_solution"):
        bad = tmp_path / "bad.csv"
        bad.write_text("a,b\n1,2\n")
        load_boxes(bad)


def test_units_described_as_ray_tasks_give_the_same_analysis(planted, tmp_path):
    """With a Ray instance up, units are described and groups clustered by Ray tasks; the
    result is the same as in one process."""
    ray = pytest.importorskip("ray")
    path = tmp_path / "s.zarr"
    shutil.copytree(planted["path"], path)
    shutil.rmtree(path / "analysis")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        s = analyze(str(path), config=AnalysisConfig(groups="class"))
    finally:
        ray.shutdown()
    assert s.ray_tasks and not planted["summary"].ray_tasks
    assert s.rows_described == planted["summary"].rows_described
    serial = zarr.open_group(str(planted["path"]), path="analysis/rows", mode="r")
    parallel = zarr.open_group(str(path), path="analysis/rows", mode="r")
    for name in (*DESCRIPTORS, "described", "strategy"):
        np.testing.assert_array_equal(np.asarray(parallel[name][:]), np.asarray(serial[name][:]))
    serial = zarr.open_group(str(planted["path"]), path="analysis/groups", mode="r")
    parallel = zarr.open_group(str(path), path="analysis/groups", mode="r")
    assert serial["k"].shape[0] > 1  # several groups: more than one clustering task's worth
    for name in ("k", "sizes", "exemplars"):
        np.testing.assert_array_equal(np.asarray(parallel[name][:]), np.asarray(serial[name][:]))
    for name in ("centroids", "silhouette"):
        np.testing.assert_allclose(np.asarray(parallel[name][:]), np.asarray(serial[name][:]),
                                   rtol=1e-6, atol=1e-7)  # fmt: skip


def test_compare_two_methods_of_one_store(tmp_path):
    """A run with two methods keeps the second in methods/<name>; comparing it with maps."""
    maps, target, _ = _planted_rows(seed=4)
    path = tmp_path / "s.zarr"
    n = len(maps)
    create_store(path, StoreLayout(num_rows=n, unit_size=UNIT, image_size=S, pool=POOL, methods=("unioncam", "gradcam")))  # fmt: skip
    status = np.zeros(n, np.uint8)
    other = np.roll(maps, 8, axis=1)
    for u in range(-(-n // UNIT)):
        s, e = u * UNIT, min(n, (u + 1) * UNIT)
        write_unit(path, read_layout(path), u, {"maps": maps[s:e], "methods/gradcam": other[s:e],
                             "status": status[s:e], "target": target[s:e]})  # fmt: skip
    analyze(str(path), config=AnalysisConfig(groups="class"), compare=str(path),
            compare_maps=("maps", "methods/gradcam"), parallel=False)  # fmt: skip
    a = open_reader(str(path)).analysis()
    rho = np.asarray(a.compare["spearman"][:])
    assert np.isfinite(rho).all() and rho.mean() < 0.9
    assert a.compare.attrs["maps"] == ["maps", "methods/gradcam"]
    with pytest.raises(ValueError, match="no map array 'methods/nope'"):
        analyze(str(path), compare=str(path), compare_maps=("maps", "methods/nope"))


def test_an_analysed_store_still_verifies(planted, capsys):
    """The analysis group sits beside the run's arrays: 'unioncam verify --deep' (checksums
    and row invariants of every unit) still passes on an analysed store."""
    assert (Path(planted["path"]) / "analysis" / "rows").is_dir()
    assert main(["verify", str(planted["path"]), "--deep"]) == 0
    assert "0 bad" in capsys.readouterr().out


def test_analyze_opens_the_store_a_constant_number_of_times(tmp_path, monkeypatch):
    """The store is opened per pass, not per unit: 20 units and 5 units cost the same."""
    import pipeline.analysis.reader as reader_mod
    import pipeline.analysis.store_analysis as analysis_mod
    from pipeline.store import io

    opens: list[str] = []

    def counted(path, *a, **k):
        opens.append(str(path))
        return io.open_store(path, *a, **k)

    monkeypatch.setattr(reader_mod, "open_store", counted)
    monkeypatch.setattr(analysis_mod, "open_store", counted)
    rng = np.random.default_rng(3)
    counts = {}
    for units in (20, 5):
        n = units * UNIT
        maps = rng.random((n, S, S)).astype(np.float32)
        path = write_store(tmp_path / f"s{units}.zarr", maps, np.arange(n) % 4, bad=False)
        opens.clear()
        summary = analyze(str(path), config=AnalysisConfig(groups="class"), parallel=False)
        assert summary.units == units and summary.rows_described == n
        counts[units] = len(opens)
    assert counts[20] == counts[5] <= 4, counts


def test_compare_maps_without_compare_is_a_usage_error(planted, capsys):
    """It used to exit 0 and compare nothing; now one line says what is missing."""
    assert main(["analyze", str(planted["path"]), "--compare-maps", "maps,methods/gradcam"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--compare-maps needs --compare" in err, err
