"""Faithfulness evaluation (pipeline.analysis.evaluate) and the report (pipeline.analysis.report).

Real photos (the suite's, made from scikit-image's), the packaged pretrained
EfficientNet-Lite0 at 64 px on an early layer (``_blocks.4``, 40 channels, so Score-CAM costs
40 forwards per image), coarse RISE steps (512 px per step = 8 steps), a real Zarr store
written with the store's own ``create_store``/``write_unit``, and a real Parquet manifest
for the gallery's originals.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.analysis.evaluate import DEFAULT_METHODS, check_methods, compare_methods
from pipeline.analysis.report import (
    ReportConfig,
    ReportError,
    bootstrap_ci,
    build_report,
    main,
    paired_bootstrap,
    summarize_store,
)
from pipeline.run.metrics import evaluate_batch
from pipeline.store.names import member_metric, metric_names, parse_metric_name, store_metric_names
from unioncam import UnionCAM
from unioncam import metrics as M

SIZE = 64
LAYER = "_blocks.4"
STEP = 512  # 64*64/512 = 8 RISE steps
CHUNK = 16
PHOTOS = [0, 1, 18]  # rows of labels.csv (coffee, chelsea, motorcycle)
FUSED = "fused:denoised+scorecam"  # the paper's L_fused, by its pool-member name


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """64-px forwards gain nothing from intra-op threads, and on a shared 2-core machine
    two spinning OpenMP threads per process are several times slower than one (measured
    here: 338 s for this module with 2 threads under load, ~85 s with 1). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(effnet, sample_dir, labels, idx):
    pre = effnet.preprocess.with_size(SIZE)
    xs = []
    for i in idx:
        with Image.open(sample_dir / labels[i]["file"]) as img:
            xs.append(pre(img)[0])
    return torch.stack(xs)


@pytest.fixture(scope="module")
def batch(effnet, sample_dir, sample_labels):
    """Three real photos and the fast-preset UnionCAM result (with every pool member's map)."""
    x = _batch(effnet, sample_dir, sample_labels, PHOTOS)
    with UnionCAM(effnet.model, LAYER, "fast", groups=8, chunk_size=CHUNK, channels_last=False,
                  return_components=True) as cam:  # fmt: skip
        res = cam(x)
    return x, res


# ---------------------------------------------------------------------------------------
# evaluate_batch
def test_metric_names_round_trip():
    pool = ("region:scorecam", "fused:denoised+scorecam")
    names = metric_names(pool, all_members=True)
    assert names[:3] == ("insertion", "deletion", "ins_minus_del")
    assert member_metric("deletion", pool[1]) in names and len(names) == 3 + 3 * len(pool)
    assert parse_metric_name("insertion@fused:denoised+scorecam") == (
        "insertion", "fused:denoised+scorecam")  # fmt: skip
    assert parse_metric_name("deletion") == ("deletion", None)
    # store names: requested ones, plus per member only for the insertion/deletion family
    got = store_metric_names(("average_drop", "insertion"), pool, all_members=True)
    assert got == ("average_drop", "insertion", "insertion@region:scorecam",
                   "insertion@fused:denoised+scorecam")  # fmt: skip


def test_evaluate_batch_equals_the_metrics_called_directly(effnet, batch):
    x, res = batch
    model = effnet.model
    got = evaluate_batch(model, x, res, all_members=True, step=STEP, chunk_size=CHUNK)
    assert set(got) == set(metric_names(res.pool, all_members=True))
    direct = M.insertion_deletion(model, x, res.maps, targets=res.target, step=STEP,
                                  chunk_size=CHUNK)  # fmt: skip
    np.testing.assert_allclose(got["insertion"], direct.insertion.numpy(), atol=1e-5)
    np.testing.assert_allclose(got["deletion"], direct.deletion.numpy(), atol=1e-5)
    np.testing.assert_allclose(got["ins_minus_del"], direct.ins_minus_del.numpy(), atol=1e-5)
    for p in res.pool:
        d = M.insertion_deletion(model, x, res.components[p], targets=res.target, step=STEP,
                                 chunk_size=CHUNK)  # fmt: skip
        np.testing.assert_allclose(got[member_metric("insertion", p)], d.insertion.numpy(),
                                   atol=1e-5)  # fmt: skip
        np.testing.assert_allclose(got[member_metric("deletion", p)], d.deletion.numpy(),
                                   atol=1e-5)  # fmt: skip
    # the selected map's numbers are its member's
    for i, s in enumerate(res.selected.tolist()):
        assert got["insertion"][i] == pytest.approx(
            got[member_metric("insertion", res.pool[s])][i], abs=1e-5)  # fmt: skip
    # selected-only mode gives the same numbers as all-members mode
    sel_only = evaluate_batch(model, x, res, step=STEP, chunk_size=CHUNK)
    assert set(sel_only) == {"insertion", "deletion", "ins_minus_del"}
    np.testing.assert_allclose(sel_only["insertion"], got["insertion"], atol=1e-5)
    assert all(v.dtype == np.float32 and v.shape == (3,) for v in got.values())
    # a real model on real photos: AUCs are probabilities' areas, not all equal
    assert np.all((got["insertion"] >= 0) & (got["insertion"] <= 1))
    assert np.ptp(got["insertion"]) > 1e-3


def test_evaluate_batch_is_batch_and_chunk_invariant(effnet, batch):
    x, res = batch
    full = evaluate_batch(effnet.model, x, res, all_members=True, step=STEP, chunk_size=CHUNK)
    from unioncam import Engine

    other = Engine(effnet.model, chunk_size=5, channels_last=True)  # speed settings only
    fmt = evaluate_batch(other, x, res, all_members=True, step=STEP)
    assert effnet.model._conv_stem.weight.is_contiguous()  # the engine gave the model back
    for k in full:
        np.testing.assert_allclose(fmt[k], full[k], atol=2e-5, err_msg=k)
    # image 1 alone (its own UnionCAM run) equals its row in the batch. (Not on every photo:
    # maps move by ~1e-6 with the batch, and where a map has many tied values that reorders
    # pixels across a RISE step; the mirrored chelsea photo moved a deletion AUC by 5e-3.)
    with UnionCAM(effnet.model, LAYER, "fast", groups=8, chunk_size=CHUNK, channels_last=False,
                  return_components=True) as cam:  # fmt: skip
        alone = cam(x[1:2])
    assert alone.selected.item() == res.selected[1].item()
    one = evaluate_batch(effnet.model, x[1:2], alone, all_members=True, step=STEP,
                         chunk_size=CHUNK)  # fmt: skip
    for k in full:
        np.testing.assert_allclose(one[k], full[k][1:2], atol=2e-5, err_msg=k)


def test_evaluate_batch_bad_inputs_are_one_line(effnet, batch):
    x, res = batch
    with UnionCAM(effnet.model, LAYER, "fast", groups=8, chunk_size=CHUNK) as cam:
        plain = cam(x[:1])
    with pytest.raises(ValueError, match="return_components=True") as e:
        evaluate_batch(effnet.model, x[:1], plain, all_members=True, step=STEP)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="x has 2 images but the result explains 3"):
        evaluate_batch(effnet.model, x[:2], res, step=STEP)
    with pytest.raises(ValueError, match="CAMResult"):
        evaluate_batch(effnet.model, x, res.maps, step=STEP)


# ---------------------------------------------------------------------------------------
# compare_methods
def test_compare_methods_returns_every_method_and_the_paper_unioncam(effnet, batch):
    x, _ = batch
    c = compare_methods(effnet.model, x, layer=LAYER, step=STEP, chunk_size=CHUNK, groups=8,
                        channels_last=False)  # fmt: skip
    assert list(c) == list(DEFAULT_METHODS) and c.reference == "unioncam:paper"
    n_curve = SIZE * SIZE // STEP + 1
    for m, s in c.items():
        assert s.insertion.shape == s.deletion.shape == (3,), m
        assert s.insertion_curve.shape == s.deletion_curve.shape == (3, n_curve), m
        assert s.maps.shape == (3, SIZE, SIZE), m
        assert np.all(np.isfinite(s.insertion)) and np.all((s.maps >= 0) & (s.maps <= 1 + 1e-6))
        # the AUC is the trapezoid area of the returned curve
        area = (s.insertion_curve.sum(1) - 0.5 * (s.insertion_curve[:, 0]
                + s.insertion_curve[:, -1])) / (n_curve - 1)  # fmt: skip
        np.testing.assert_allclose(area, s.insertion, atol=1e-5)
    # UnionCAM here is exactly the paper's UnionCAM run on its own
    with UnionCAM(effnet.model, LAYER, "paper", chunk_size=CHUNK, channels_last=False) as cam:
        paper = cam(x)
    np.testing.assert_array_equal(c.selected, paper.selected.numpy())
    assert c.pool == paper.pool
    np.testing.assert_allclose(c["unioncam:paper"].maps, paper.maps.numpy(), atol=1e-4)
    # the default preset ("unioncam") is the library's default run on its own (its 32 groups, not 8)
    with UnionCAM(effnet.model, LAYER, "faithful", chunk_size=CHUNK, channels_last=False) as cam:
        faithful = cam(x)
    np.testing.assert_allclose(c["unioncam"].maps, faithful.maps.numpy(), atol=1e-5)
    assert not np.allclose(c["unioncam"].maps, c["unioncam:paper"].maps, atol=1e-3)
    # ... and the paper UnionCAM's scores are those of the member it selected
    for i, s in enumerate(c.selected.tolist()):
        member = c["scorecam"] if s == 0 else c["fused:denoised+scorecam"]
        assert c["unioncam:paper"].insertion[i] == member.insertion[i]
        assert c["unioncam:paper"].deletion[i] == member.deletion[i]
    # different methods give different maps (not one map copied around)
    assert not np.allclose(c["gradcam"].maps, c["scorecam"].maps, atol=1e-3)
    # explained class is the prediction; Score-CAM's 40 masks ran once for 3 methods
    with torch.no_grad():
        pred = effnet.model(x).argmax(1).numpy()
    np.testing.assert_array_equal(c.classes, pred)
    assert c.forwards["metrics"] == 3 * 3 + 2 * 3 * 7 * (n_curve - 2)  # 7 distinct maps scored


def test_compare_methods_subsets_and_errors(effnet, batch):
    x, _ = batch
    c = compare_methods(effnet.model, x[:1], layer=LAYER, methods=("gradcam", "layercam"),
                        step=STEP, chunk_size=CHUNK, return_maps=False)  # fmt: skip
    assert list(c) == ["gradcam", "layercam"] and c["gradcam"].maps is None
    assert c.forwards["explain"] == 2  # one gradient pass per method, no masked forwards
    with pytest.raises(ValueError, match=re.escape("unknown method 'gradcam+++'")):
        compare_methods(effnet.model, x[:1], layer=LAYER, methods=("gradcam+++",))


# ---------------------------------------------------------------------------------------
# statistics
def test_bootstrap_ci_is_seeded_and_covers_a_known_mean():
    rng = np.random.default_rng(1)
    v = rng.normal(1.0, 1.0, size=400)
    mean, lo, hi = bootstrap_ci(v, n_boot=2000, seed=3)
    assert mean == pytest.approx(v.mean())
    assert lo < mean < hi and lo < 1.0 < hi
    # width close to the normal theory's 2 * 1.96 * sd / sqrt(n)
    assert (hi - lo) == pytest.approx(2 * 1.96 * v.std(ddof=1) / 20, rel=0.15)
    assert bootstrap_ci(v, n_boot=2000, seed=3) == (mean, lo, hi)
    assert bootstrap_ci(v, n_boot=2000, seed=4) != (mean, lo, hi)
    # NaNs are dropped; one value has no interval; none has no mean
    m1, l1, h1 = bootstrap_ci([0.5, np.nan])
    assert m1 == 0.5 and np.isnan(l1) and np.isnan(h1)
    assert np.isnan(bootstrap_ci([np.nan])[0])
    # paired: a method against itself differs by exactly 0; a constant shift is found
    assert paired_bootstrap(v, v) == (0.0, 0.0, 0.0)
    d, dlo, dhi = paired_bootstrap(v + 0.1, v)
    assert d == pytest.approx(0.1) and dlo == pytest.approx(0.1) and dhi == pytest.approx(0.1)
    with pytest.raises(ReportError, match="3 values against 2"):
        paired_bootstrap([1, 2, 3], [1, 2])


def test_normal_approximation_above_the_exact_limit(monkeypatch):
    import pipeline.analysis.report.stats as R

    v = np.random.default_rng(2).uniform(size=3000)
    exact = bootstrap_ci(v, n_boot=1000)
    monkeypatch.setattr(R, "EXACT_BOOTSTRAP_MAX", 1000)
    approx = bootstrap_ci(v, n_boot=1000)
    assert approx[0] == exact[0]
    assert approx[1] == pytest.approx(exact[1], abs=3e-3)
    assert approx[2] == pytest.approx(exact[2], abs=3e-3)


# ---------------------------------------------------------------------------------------
# report from a real store
def _md_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def _check_figures(report: Path) -> str:
    md = report.read_text()
    links = _md_images(md)
    assert links, "the report shows no figure"
    for link in links:
        p = report.parent / link
        assert p.is_file(), link
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"
    return md


@pytest.fixture(scope="module")
def small_store(effnet, sample_dir, sample_labels, tmp_path_factory):
    """A real store: 5 rows (4 photos + 1 corrupt file) in 2 units of a real manifest,
    written with real UnionCAM results, every pool member's map and metrics."""
    from pipeline.data.build import build_from_list
    from pipeline.data.decode import Status, load_row
    from pipeline.store.io import create_store, finalize_store, read_layout
    from pipeline.store.layout import StoreLayout
    from pipeline.store.units import write_unit

    tmp = tmp_path_factory.mktemp("report_store")
    (tmp / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    picks = [3, 10, 15, 20]
    entries = [(str(sample_dir / sample_labels[i]["file"]), sample_labels[i]["class_index"])
               for i in picks]  # fmt: skip
    entries.insert(2, (str(tmp / "broken.jpg"), "0"))
    with open(tmp / "list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uri", "label"])
        w.writerows(entries)
    manifest = build_from_list(tmp / "list.csv", tmp / "m.parquet", unit_size=3)
    pre = effnet.preprocess.with_size(SIZE)
    cam = UnionCAM(effnet.model, LAYER, "fast", groups=8, chunk_size=CHUNK, channels_last=False,
                   return_components=True)  # fmt: skip
    pool = cam.pool
    names = metric_names(pool, all_members=True)
    store = tmp / "s.zarr"
    create_store(store, StoreLayout(num_rows=manifest.num_rows, unit_size=3, image_size=SIZE, pool=pool, components=pool, metrics=names), attrs={"manifest": str(manifest.uri), "model": "efficientnet-lite0",
                        "weights": "pretrained-packaged", "layer": LAYER, "image_size": SIZE,
                        "target": "predicted", "config": {"metric_step": STEP}})  # fmt: skip
    with cam:
        for u in range(manifest.num_units):
            rows = manifest.read_unit(u)
            n = len(rows)
            a = {
                "maps": np.full((n, SIZE, SIZE), np.nan, np.float32),
                "status": np.zeros(n, np.uint8), "error": [""] * n,
                "label": [r.label for r in rows], "crop_box": np.full((n, 4), -1),
                "selected": np.full(n, -1), "target": np.full(n, -1),
                "beta": np.full((n, len(pool)), np.nan, np.float32),
                **{f"components/{p}": np.full((n, SIZE, SIZE), np.nan, np.float32) for p in pool},
                **{f"metrics/{k}": np.full(n, np.nan, np.float32) for k in names},
            }  # fmt: skip
            good, xs = [], []
            for i, r in enumerate(rows):
                t, _orig, box, status, msg = load_row(r, pre)
                a["status"][i], a["error"][i] = int(status), msg
                if status == Status.OK:
                    good.append(i)
                    xs.append(t)
                    a["crop_box"][i] = box
            x = torch.stack(xs)
            res = cam(x)
            ev = evaluate_batch(effnet.model, x, res, all_members=True, step=STEP,
                                chunk_size=CHUNK)  # fmt: skip
            a["maps"][good] = res.maps.numpy()
            a["selected"][good] = res.selected.numpy()
            a["target"][good] = res.target.numpy()
            a["beta"][good] = res.beta.numpy()
            for p in pool:
                a[f"components/{p}"][good] = res.components[p].numpy()
            for k, v in ev.items():
                a[f"metrics/{k}"][good] = v
            write_unit(store, read_layout(store), u, a)
    finalize_store(store)
    return store, pool


def test_report_builds_from_a_store(small_store, tmp_path):
    from pipeline.store.io import open_store

    store, pool = small_store
    g = open_store(store)
    status = np.asarray(g["status"][:])
    ok = status == 0
    assert ok.sum() == 4 and status[2] != 0  # the corrupt file failed, the rest is explained
    ins = np.asarray(g["metrics/insertion"][:], dtype=np.float64)
    sel = np.asarray(g["selected"][:])

    path = build_report(tmp_path / "rep", ReportConfig(store=str(store), n_boot=300, gallery=3))
    md = _check_figures(path)
    assert "UnionCAM (selected)" in md and "Paired differences" in md
    assert "scores.png" in md and "selection.png" in md and "gallery.png" in md
    assert "curves.png" not in md  # a store holds areas, not curves; the report says so
    info = json.loads((path.parent / "report.json").read_text())
    assert info["n"] == 4
    assert info["stats"]["methods"]["unioncam"]["insertion"]["mean"] == pytest.approx(
        ins[ok].mean(), abs=1e-6)  # fmt: skip
    assert info["selection_counts"] == {p: int((sel[ok] == j).sum()) for j, p in enumerate(pool)}
    assert set(info["stats"]["paired"]) == set(pool)
    # against the member it selected on every image, UnionCAM never loses
    by_name = {a.attrs["name"]: np.asarray(a[:]) for _, a in g["metrics"].arrays()}
    assert set(by_name) == set(metric_names(pool, all_members=True))
    for p in pool:
        member = by_name[member_metric("ins_minus_del", p)][ok]
        mine = by_name["ins_minus_del"][ok]
        assert info["stats"]["paired"][p]["ins_minus_del"]["mean"] == pytest.approx(
            float((mine - member).mean()), abs=1e-6)  # fmt: skip
    # the summary the query can print: same means, per class
    s = summarize_store(str(store))
    assert s["n"] == 4 and s["metrics"]["insertion"] == pytest.approx(ins[ok].mean(), abs=1e-6)
    assert sum(r["n"] for r in s["per_class"]) == 4
    cls = np.asarray(g["target"][:])
    for r in s["per_class"]:
        rows = ok & (cls == r["class"])
        assert r["n"] == rows.sum()
        assert r["metrics"]["insertion"] == pytest.approx(ins[rows].mean(), abs=1e-6)
        assert sum(r["selection"].values()) == rows.sum()


def test_report_from_an_image_folder_resumes_from_its_cache(effnet, sample_dir, sample_labels,
                                                            tmp_path):  # fmt: skip
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in (5, 13, 21):  # a grayscale JPEG among them
        shutil.copy(sample_dir / sample_labels[i]["file"], imgs)
    (imgs / "notes.txt").write_text("not an image")
    cfg = ReportConfig(images=imgs, layer=LAYER, image_size=SIZE, step=STEP, groups=8,
                       chunk_size=CHUNK, n_boot=300, gallery=3, keep_cache=True)  # fmt: skip
    path = build_report(tmp_path / "rep", cfg)
    md = _check_figures(path)
    for label in ("UnionCAM (paper)", "UnionCAM (faithful preset, the default)", "Grad-CAM",
                  "Grad-CAM++", "Score-CAM", "Group-CAM", "Denoised (L_den)",
                  "Fused (L_fused)"):  # fmt: skip
        assert f"| {label} |" in md or f"| **{label}** |" in md, label
    assert "curves.png" in md and "gallery.png" in md
    info = json.loads((path.parent / "report.json").read_text())
    assert info["n"] == 3 and sorted(info["images"]) == sorted(p.name for p in imgs.glob("*.JPEG"))
    assert sum(info["selection_counts"].values()) == 3
    cache = list((tmp_path / "rep" / ".cache").rglob("batch-*.npz"))
    assert len(cache) == 2  # 3 images in batches of 2, checkpointed
    # a rerun reads the checkpoints (no recomputation) and gives the same numbers
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    again = json.loads((build_report(tmp_path / "rep", cfg).parent / "report.json").read_text())
    assert again["per_image"] == info["per_image"]
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--images", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a folder" in err
    assert main(["--store", str(tmp_path / "none.zarr"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no unioncam store" in err
    (tmp_path / "imgs").mkdir()
    assert (
        main(["--images", str(tmp_path / "imgs"), str(tmp_path / "out"), "--methods", "foo"]) == 2
    )
    assert "unknown method 'foo'" in capsys.readouterr().err


def test_report_sanity_check_from_an_image_folder(effnet, sample_dir, sample_labels, tmp_path):
    """``sanity=1``: every method's randomisation curves, the same numbers as the library's
    check called directly, UnionCAM's fused component included, cached with the batches."""
    from unioncam.sanity import cascading_randomization

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(sample_dir / sample_labels[7]["file"], imgs)
    cfg = ReportConfig(images=imgs, layer="_blocks.15", image_size=SIZE, step=STEP, groups=8,
                       chunk_size=CHUNK, n_boot=100, gallery=0, keep_cache=True,
                       methods=("gradcam", FUSED, "groupcam"), sanity=1)  # fmt: skip
    path = build_report(tmp_path / "rep", cfg)
    md = _check_figures(path)
    assert "## Sanity check: model randomisation" in md and "sanity.png" in md
    for label in ("Grad-CAM", "Fused (L_fused)", "Group-CAM"):
        assert f"| {label} | " in md.split("## Sanity check")[1], label
    san = json.loads((path.parent / "report.json").read_text())["sanity"]
    assert list(san) == ["gradcam", FUSED, "groupcam"]
    x = effnet.preprocess.with_size(SIZE)(Image.open(next(imgs.iterdir())).convert("RGB"))[0][None]
    want = cascading_randomization(effnet.model, x, "gradcam", "_blocks.15", past_layer=2,
                                   chunk_size=CHUNK)  # fmt: skip
    # _fc, _bn1 and _conv_head leave _blocks.15 alone; re-initialising it changes its output
    assert want.steps[want.layer_step] == "_blocks.15"
    assert san["gradcam"]["steps"] == want.steps == san[FUSED]["steps"]
    np.testing.assert_allclose(san["gradcam"]["spearman"], want.spearman.mean(0).numpy(), atol=1e-3)
    assert san[FUSED]["spearman"][0] == pytest.approx(1.0)
    # the map of a block whose weights are random is not the trained block's map
    assert san["gradcam"]["spearman"][-1] < 0.9
    cached = list((tmp_path / "rep" / ".cache").rglob("sanity-1.json"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    build_report(tmp_path / "rep", cfg)
    assert cached[0].stat().st_mtime_ns == stamp  # a rerun reads it


# ---------------------------------------------------------------------------------------
# one method vocabulary, from the registry to the report
def test_report_method_names_are_the_registry_and_the_presets(tmp_path, capsys):
    """A report's methods are named as everywhere else: the registry's names, then
    ``unioncam:<preset>`` (``unioncam`` alone is the default preset), titled by the library;
    an old or unknown name is one line naming the choices (or the new spelling)."""
    from unioncam import DEFAULT_PRESET, METHODS, PRESETS
    from unioncam.names import PRESET_LABELS, check_method, method_label, method_names

    presets = {f"unioncam:{p}" for p in PRESETS if p != DEFAULT_PRESET}
    assert len(METHODS) == 15
    assert set(method_names()) == set(METHODS.names()) | presets
    assert method_names()[: len(METHODS)] == METHODS.names()
    assert check_method(f"unioncam:{DEFAULT_PRESET}") == "unioncam"  # one spelling per method
    assert check_methods([*method_names(), f"unioncam:{DEFAULT_PRESET}"]) == method_names()
    # every default report method is in the vocabulary; labels come from the library
    assert set(DEFAULT_METHODS) - {FUSED} <= set(method_names())
    assert method_label("unioncam") == PRESET_LABELS[DEFAULT_PRESET]
    assert method_label("unioncam:paper") == "UnionCAM (paper)"
    assert method_label("gradcam") == METHODS.info("gradcam")["label"] == "Grad-CAM"
    assert method_label(FUSED) == "Fused (L_fused)"
    assert len({method_label(m) for m in method_names()}) == len(method_names())
    for bad, says in (("faithful", "now spelled unioncam"), ("fused", "now spelled " + FUSED),
                      ("foo", "choose from gradcam, gradcam++"),
                      ("unioncam:nope", "unioncam:paper"), ("fused:x+y", "fused:<gradient>+<region>")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(says)) as e:
            check_methods([bad])
        assert "\n" not in str(e.value) and repr(bad) in str(e.value)
    # ... and so the CLI (the choices named in its one line)
    (tmp_path / "imgs").mkdir()
    assert main(["--images", str(tmp_path / "imgs"), str(tmp_path / "out"),
                 "--methods", "unioncam,faithful"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'faithful' is now spelled unioncam" in err
    assert main(["--images", str(tmp_path / "imgs"), str(tmp_path / "out"),
                 "--methods", "gradcam,nope"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and ", ".join(method_names()) in err
    with pytest.raises(ReportError, match="exactly one source"):
        ReportConfig()
    with pytest.raises(ReportError, match="groups must be a positive integer"):
        ReportConfig(store="s", groups=0)
