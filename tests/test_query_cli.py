"""Query API and ``unioncam`` CLI on a real store made by a real run.

The store is built once per module through the CLI itself (``unioncam manifest`` then
``unioncam run`` in-process, on this module's local Ray cluster): 11 real ImageNet JPEGs and
one corrupt file, 4-row units. The query results are checked against brute-force numpy over
the raw Zarr arrays (fine at this size; the API itself reads unit by unit).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ray = pytest.importorskip("ray")

from pipeline.analysis.images import overlay_image  # noqa: E402
from pipeline.analysis.overlays import row_overlay  # noqa: E402
from pipeline.analysis.reader import open_reader  # noqa: E402
from pipeline.analysis.status import store_status  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.data.classes import load_class_names  # noqa: E402
from pipeline.data.decode import Status, decode_image, read_bytes  # noqa: E402
from pipeline.data.manifest import Manifest  # noqa: E402
from pipeline.store.io import open_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_GOOD = 11
BAD_ROW = 5
RUN_ARGS = [
    "--cpu", "--cpus-per-actor", "1", "--actors", "2", "--preset", "fast", "--groups", "4",
    "--chunk-size", "16", "--image-size", "64", "--batch-size", "4", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():  # another module's cluster must not leak into this one
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def made(ray_cluster, tmp_path_factory, sample_dir, sample_labels):
    tmp = tmp_path_factory.mktemp("query")
    rows = sample_labels[:N_GOOD]
    (tmp / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    entries = [(str(sample_dir / r["file"]), r["class_index"]) for r in rows]
    entries.insert(BAD_ROW, (str(tmp / "broken.jpg"), "0"))
    with open(tmp / "list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uri", "label"])
        w.writerows(entries)
    manifest, store = tmp / "m.parquet", tmp / "s.zarr"
    assert main(["manifest", str(tmp / "list.csv"), str(manifest), "--unit-size", "4"]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", str(manifest), str(store), *RUN_ARGS]) == 0
    g = open_store(str(store))
    raw = {n: np.asarray(g[n][:]) for n in ("maps", "beta", "selected", "prob", "status",
                                              "target", "label", "crop_box")}  # fmt: skip
    return {"tmp": tmp, "store": store, "manifest": manifest, "entries": entries, "raw": raw,
            "run_out": out.getvalue(),
            "pool": tuple(g["beta"].attrs["pool"])}  # fmt: skip


def _ok(raw) -> np.ndarray:
    return raw["status"] == int(Status.OK)


# ---------------------------------------------------------------------------------------
# CLI surface: help and one-line errors
def test_console_script_help_is_fast_and_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True,
        cwd=REPO, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0
    for cmd in ("manifest", "run", "status", "query", "export", "demo"):
        assert cmd in out.stdout


@pytest.mark.parametrize(
    "argv",
    [["manifest"], ["run"], ["status"], ["query"], ["query", "S", "top"], ["query", "S", "maps"],
     ["query", "S", "classes"], ["query", "S", "mean"], ["query", "S", "row"], ["export"],
     ["demo"]],
)  # fmt: skip
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: unioncam" in capsys.readouterr().out


def _one_line_error(argv, capsys) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_errors_are_one_line_with_exit_code_2(made, tmp_path, capsys):
    m, store = str(made["manifest"]), str(made["store"])
    assert "no unioncam store" in _one_line_error(["status", str(tmp_path / "nope.zarr")], capsys)
    assert "nope.parquet" in _one_line_error(
        ["run", str(tmp_path / "nope.parquet"), "x.zarr"], capsys
    )
    line = _one_line_error(
        ["run", m, str(tmp_path / "o.zarr"), "--layer", "no_such_layer", *RUN_ARGS], capsys
    )
    assert "no_such_layer" in line and "layer" in line
    line = _one_line_error(["run", m, str(tmp_path / "o.zarr"), "--preset", "nope"], capsys)
    assert "preset" in line and "nope" in line
    line = _one_line_error(["run", m, str(tmp_path / "o.zarr"), "--batch-size", "0"], capsys)
    assert "batch_size" in line
    line = _one_line_error(["run", m, str(tmp_path / "o.zarr"), "--model", "no_such_model"], capsys)
    assert "no_such_model" in line
    assert "score" in _one_line_error(["query", store, "top", "--by", "nonsense"], capsys)
    assert "row id 999" in _one_line_error(
        ["query", store, "maps", "--rows", "999", "--out", str(tmp_path)], capsys
    )
    assert "--bogus" in _one_line_error(["run", m, store, "--bogus"], capsys)
    assert "invalid int" in _one_line_error(["query", store, "top", "-k", "x"], capsys)
    assert "nope" in _one_line_error(
        ["manifest", str(tmp_path / "nope"), str(tmp_path / "m.parquet")], capsys
    )
    # A store made with other settings: refused with the reason, no traceback.
    line = _one_line_error(
        ["run", m, store, *RUN_ARGS[:-5], "--image-size", "96", "--no-progress"], capsys
    )
    assert "different run" in line and "--overwrite" in line and "overwrite=True" in line
    assert "image_size: store 64, this run 96" in line
    # ... and every differing setting is named with both values in full, preset included
    args = [a if a != "fast" else "faithful-fast" for a in RUN_ARGS]
    line = _one_line_error(["run", m, store, *args], capsys)
    assert "preset: store custom (fast with groups=4), this run custom (faithful-fast with groups=4)" in line, line
    assert "'region:groupcam', 'fused:denoised+groupcam'" in line  # the pools, not cut short


def test_one_line_error_in_a_real_subprocess(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", str(tmp_path / "missing.zarr")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "missing.zarr" in out.stderr


# ---------------------------------------------------------------------------------------
# status, stats, top-k
def test_status_api_and_cli(made, capsys):
    st = store_status(open_reader(str(made["store"])))
    assert st.complete and st.units_done == st.num_units == 3 and st.state == "finished"
    assert st.rows_by_status == {"OK": N_GOOD, "CORRUPT": 1}
    assert main(["status", str(made["store"])]) == 0
    out = capsys.readouterr().out
    assert "state: finished" in out and "3 of 3" in out and "CORRUPT=1" in out
    # Which file failed, and why: in status and in the run's own summary.
    bad = made["entries"][BAD_ROW][0]
    assert st.failed_rows[0][:3] == (BAD_ROW, bad, "CORRUPT")
    assert f"row {BAD_ROW} {bad}: CORRUPT" in out
    assert f"row {BAD_ROW} {bad}: CORRUPT" in made["run_out"]
    assert "start-up" in made["run_out"] and "explaining" in made["run_out"]
    assert main(["status", str(made["store"]), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["complete"] is True and js["rows_by_status"]["OK"] == N_GOOD


def test_class_stats_match_brute_force(made, capsys):
    raw, pool = made["raw"], made["pool"]
    stats = open_reader(str(made["store"])).class_stats()
    ok = _ok(raw)
    assert sum(s.count for s in stats) == ok.sum()
    for s in stats:
        m = ok & (raw["target"] == s.class_index)
        assert s.count == m.sum()
        sel = raw["selected"][m].astype(int)
        beta = raw["beta"][m][np.arange(m.sum()), sel]
        assert s.mean_beta == pytest.approx(float(beta.mean()), rel=1e-5)
        assert s.mean_prob == pytest.approx(float(raw["prob"][m].mean()), rel=1e-5)
        assert sum(s.wins.values()) == s.count
        assert s.wins[pool[0]] == int((sel == 0).sum())
    by_label = open_reader(str(made["store"])).class_stats(by="label")
    assert {s.class_index for s in by_label} == set(raw["label"][ok].tolist())
    assert main(["query", str(made["store"]), "classes"]) == 0
    out = capsys.readouterr().out
    names = load_class_names()
    assert names[stats[0].class_index][:20] in out


@pytest.mark.parametrize("score", ["beta", "prob", "baseline_prob", "beta:region:groupcam"])
def test_top_and_bottom_k_match_brute_force(made, score):
    raw = made["raw"]
    r = open_reader(str(made["store"]))
    g = open_store(str(made["store"]))
    if score == "beta":
        v = raw["beta"][np.arange(len(raw["selected"])), np.maximum(raw["selected"], 0)]
    elif score.startswith("beta:"):
        v = raw["beta"][:, made["pool"].index(score[5:])]
    else:
        v = np.asarray(g[score][:])
    ok = np.nonzero(_ok(raw))[0]
    for largest in (True, False):
        got = r.top_k(score, 4, largest=largest)
        order = ok[np.argsort(-v[ok] if largest else v[ok], kind="stable")][:4]
        assert [x.row_id for x in got] == order.tolist()
        np.testing.assert_allclose([x.score for x in got], v[order], rtol=1e-6)
        assert BAD_ROW not in [x.row_id for x in got]
    c = int(raw["target"][ok[0]])
    assert all(x.target == c for x in r.top_k(score, 5, class_index=c))


def test_top_cli_prints_rows(made, capsys):
    assert main(["query", str(made["store"]), "top", "--by", "prob", "-k", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]
    files = {row: uri for row, (uri, _label) in enumerate(made["entries"])}
    assert [x["uri"] for x in rows] == [files[x["row_id"]] for x in rows]
    assert main(["query", str(made["store"]), "top", "--by", "prob", "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()[1:]
    assert [ln.split()[-1] for ln in table] == [files[x["row_id"]] for x in rows]


def test_row_cli_names_the_file_and_its_fields(made, capsys):
    ok_row = int(np.nonzero(_ok(made["raw"]))[0][0])
    assert main(["query", str(made["store"]), "row", str(ok_row)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"row {ok_row}: {made['entries'][ok_row][0]}\n")
    assert "status: OK" in out and f"beta {made['raw']['beta'][ok_row, 0]:9.5f}" in out
    assert main(["query", str(made["store"]), "row", str(BAD_ROW), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["status_name"] == "CORRUPT" and js["uri"] == made["entries"][BAD_ROW][0]
    assert "broken.jpg" in js["error"]


# ---------------------------------------------------------------------------------------
# maps, overlays, mean maps, export
def test_maps_and_overlays(made, tmp_path, capsys):
    from PIL import Image

    raw = made["raw"]
    r = open_reader(str(made["store"]))
    rows = [0, 7, BAD_ROW]
    maps = r.maps(rows)
    assert maps.dtype == np.float32 and maps.shape == (3, 64, 64)
    np.testing.assert_array_equal(maps[:2], raw["maps"][[0, 7]].astype(np.float32))
    assert np.isnan(maps[2]).all()
    out = tmp_path / "ov"
    assert main(["query", str(made["store"]), "maps", "--rows", "0,7,5", "--overlay", "--npy",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "skipped 1 rows" in capsys.readouterr().out
    pngs = sorted(out.glob("*.png"))
    stems = [Path(made["entries"][r][0]).stem for r in (0, 7)]
    assert [p.name for p in pngs] == [f"0000000_{stems[0]}.png", f"0000007_{stems[1]}.png"]
    np.testing.assert_array_equal(np.load(out / "maps.npy")[:2], maps[:2])
    for p, row in zip(pngs, (0, 7), strict=True):
        orig = decode_image(read_bytes(made["entries"][row][0]))
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == orig.size and im.mode == "RGB"
            ov = np.asarray(im)
        left, top, right, bottom = raw["crop_box"][row]
        o = np.asarray(orig)
        # Outside the crop the photo is unchanged; inside it the heat map is blended in.
        if left > 0:
            np.testing.assert_array_equal(ov[:, :left], o[:, :left])
        if top > 0:
            np.testing.assert_array_equal(ov[:top], o[:top])
        assert np.abs(ov[top:bottom, left:right].astype(int) - o[top:bottom, left:right]).mean() > 5
    # The overlay equals the documented recipe on the original image.
    expect = overlay_image(
        decode_image(read_bytes(made["entries"][0][0])), maps[0], tuple(raw["crop_box"][0])
    )
    np.testing.assert_array_equal(np.asarray(row_overlay(r, 0)), np.asarray(expect))
    with pytest.raises(ValueError, match="row 5 has no map: status CORRUPT"):
        row_overlay(r, BAD_ROW)


def test_mean_maps_match_brute_force(made, tmp_path, capsys):
    raw = made["raw"]
    r = open_reader(str(made["store"]))
    ok = _ok(raw)
    classes = sorted(set(raw["target"][ok].tolist()))
    means = r.mean_maps(classes[:2], rows_per_read=2)
    assert sorted(means) == classes[:2]
    for c, (m, n) in means.items():
        sel = ok & (raw["target"] == c)
        assert n == sel.sum()
        np.testing.assert_allclose(m, raw["maps"][sel].astype(np.float64).mean(0), atol=1e-6)
    assert (
        main(
            [
                "query",
                str(made["store"]),
                "mean",
                "--classes",
                str(classes[0]),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / f"mean-class-{classes[0]:04d}.png").is_file()
    # Classes asked for without rows are named, not skipped silently.
    empty = sorted(set(range(0, 1000, 2)) - set(raw["target"][ok].tolist()))[:3]  # not a range
    capsys.readouterr()
    spec = ",".join(str(c) for c in [classes[0], *empty])
    assert main(["query", str(made["store"]), "mean", "--classes", spec, "--out", str(tmp_path)]) == 0
    assert f"no OK rows for classes {', '.join(map(str, empty))}" in capsys.readouterr().out


def test_export_csv_and_overlays(made, tmp_path, capsys):
    path = tmp_path / "scores.csv"
    assert (
        main(
            [
                "export",
                str(made["store"]),
                "--csv",
                str(path),
                "--overlays",
                str(tmp_path / "png"),
                "--limit",
                "3",
            ]
        )
        == 0
    )
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_GOOD + 1
    assert rows[BAD_ROW]["status"] == "CORRUPT" and "broken.jpg" in rows[BAD_ROW]["error"]
    assert rows[0]["status"] == "OK" and rows[0]["selected"] in made["pool"]
    assert [row["uri"] for row in rows] == [uri for uri, _label in made["entries"]]
    assert float(rows[0][f"beta:{made['pool'][0]}"]) == pytest.approx(
        float(made["raw"]["beta"][0, 0]), rel=1e-5
    )
    assert len(list((tmp_path / "png").glob("*.png"))) == 3
    _one_line_error(["export", str(made["store"])], capsys)


def test_demo_runs_offline_on_bundled_photos(ray_cluster, tmp_path, capsys):
    """The README's first command, at 64 px so it stays quick in the suite."""
    from pipeline.demo import DEMO_IMAGES, run_demo

    assert run_demo(out=tmp_path / "demo", image_size=64) == 0
    out = capsys.readouterr().out
    r = open_reader(str(tmp_path / "demo" / "store.zarr"))
    st = store_status(r)
    assert st.complete and st.rows_by_status == {"OK": len(DEMO_IMAGES)}
    names = load_class_names()
    m = Manifest.open(str(tmp_path / "demo" / "manifest.parquet"))
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.split()}
    for row in (r for u in range(m.num_units) for r in m.read_unit(u)):
        stem = Path(row.uri).stem
        assert stem in DEMO_IMAGES
        # Each image's line names the class explained for *that* image's row.
        assert names[r.row(row.row_id)["target"]][:26] in lines[stem]
    assert len(list((tmp_path / "demo" / "overlays").glob("*.png"))) == len(DEMO_IMAGES)


def test_method_option_runs_two_methods_and_every_reader_takes_it(made, tmp_path, capsys):
    """``run --method gradcam,unioncam``, then ``--method`` on maps, mean and overlays."""
    manifest, store = str(made["manifest"]), str(tmp_path / "two.zarr")
    assert main(["run", manifest, store, *RUN_ARGS, "--method", "gradcam,unioncam",
                 "--max-units", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert main(["status", store]) == 0
    assert "methods: gradcam, unioncam" in capsys.readouterr().out
    r = open_reader(store)
    d = tmp_path / "q"
    assert main(["query", store, "maps", "--rows", "0,1", "--npy", "--method", "gradcam",
                 "--out", str(d)]) == 0  # fmt: skip
    np.testing.assert_array_equal(np.load(d / "maps.npy"), r.maps([0, 1], method="gradcam"))
    assert not np.array_equal(r.maps([0, 1], method="gradcam"), r.maps([0, 1]))
    assert main(["query", store, "mean", "--method", "gradcam", "--out", str(d)]) == 0
    assert list(d.glob("mean-class-*-gradcam.png"))
    assert main(["export", store, "--overlays", str(d / "ov"), "--method", "gradcam",
                 "--rows", "0"]) == 0  # fmt: skip
    stem = Path(made["entries"][0][0]).stem
    assert [p.name for p in (d / "ov").iterdir()] == [f"0000000_{stem}_gradcam.png"]
    capsys.readouterr()
    assert "no maps of method 'scorecam'" in _one_line_error(
        ["query", store, "maps", "--rows", "0", "--method", "scorecam", "--out", str(d)], capsys
    )
    assert "unknown method 'nope'" in _one_line_error(
        ["run", manifest, str(tmp_path / "x.zarr"), *RUN_ARGS, "--method", "nope"], capsys
    )
    assert "start-up" in out  # the run's own summary
