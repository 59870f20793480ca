"""The atlas (``unioncam atlas``) in a real browser: headless Chromium from Debian's
``chromium`` package loads the pages from ``file://`` and must show the expected class
names and images, with no JavaScript error; skipped (with the reason) without Chromium.

The store is the planted-strategy store of ``test_analysis`` whose rows point at the
suite's photos through a real manifest, so overlays are drawn on real photos.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import tempfile

import numpy as np
import pytest
from PIL import Image
from test_analysis import BAD_MAP_ROW, FAILED_ROW, _planted_rows, write_store

from pipeline.analysis.store_analysis import AnalysisConfig, analyze
from pipeline.cli import main
from pipeline.data.build import build_from_list
from pipeline.data.classes import load_class_names

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="headless Chromium is not installed (Debian: apt-get install chromium)",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory, sample_dir, sample_labels):
    tmp = tmp_path_factory.mktemp("atlas")
    maps, target, _ = _planted_rows(seed=3)
    files = [sample_dir / r["file"] for r in sample_labels]
    uris = [files[i % len(files)] for i in range(len(maps))]
    with open(tmp / "list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uri", "label"])
        w.writerows([str(u), int(c)] for u, c in zip(uris, target, strict=True))
    manifest = tmp / "m.parquet"
    build_from_list(tmp / "list.csv", manifest, unit_size=16)
    sizes = []
    for u in uris:
        with Image.open(u) as im:
            sizes.append((im.height, im.width))
    store = write_store(tmp / "s.zarr", maps, target, attrs={"manifest": str(manifest)},
                        sizes=np.array(sizes))  # fmt: skip
    shifted = write_store(tmp / "shifted.zarr", np.roll(maps, 5, axis=1), target,
                          attrs={"manifest": str(manifest)}, sizes=np.array(sizes))  # fmt: skip
    # one box per photo, on its central half: class 8's maps look there, class 9's left of it
    with open(tmp / "boxes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uri", "class", "x1", "y1", "x2", "y2"])
        for f in files:
            with Image.open(f) as im:
                w.writerow([f.name, "", im.width / 4, im.height / 4, im.width * 3 / 4,
                            im.height * 3 / 4])  # fmt: skip
    analyze(str(store), config=AnalysisConfig(groups="class", boxes=str(tmp / "boxes.csv")),
            compare=str(shifted), parallel=False)  # fmt: skip
    out = tmp / "site"
    assert main(["atlas", str(store), "--out", str(out)]) == 0
    return out


def test_atlas_files_link_only_to_local_files(site):
    pages = sorted(site.glob("*.html"))
    assert {p.name for p in pages} == {"index.html", "compare.html", "group-7.html",
                                       "group-8.html", "group-9.html"}  # fmt: skip
    for p in pages:
        text = p.read_text()
        assert "http://" not in text and "https://" not in text, p.name
        for src in re.findall(r'(?:src|href)="([^"#]+)"', text):
            assert (site / src).is_file(), f"{p.name} links to a missing {src}"
    group = (site / "group-7.html").read_text()
    assert "strategy 1" in group and "Clever-Hans candidate" in group
    assert "planted failure" in group or "planted failure" in (site / "group-8.html").read_text() \
        or "planted failure" in (site / "group-9.html").read_text()  # fmt: skip
    # exemplars are drawn on the photos (not the map-alone fallback)
    assert re.search(r'src="img/row-\d{7}\.png"', group)
    assert "photo not shown" not in group


def _chromium(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr",
             "--v=0", "--virtual-time-budget=5000", *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


def _js_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "Uncaught" in ln or "CONSOLE(" in ln
            and "error" in ln.lower()]  # fmt: skip


@needs_chromium
def test_pages_render_in_headless_chromium(site, tmp_path):
    names = load_class_names()
    for page, expect in (("index.html", [names[7], names[8], names[9], "Groups (3)"]),
                         ("group-7.html", [names[7], "strategy 0", "strategy 1"]),
                         ("compare.html", ["Classes by agreement", names[8]])):  # fmt: skip
        run = _chromium(["--dump-dom", (site / page).as_uri()])
        assert run.returncode == 0, run.stderr[-2000:]
        dom = run.stdout
        for text in expect:
            assert text in dom, f"{page} does not show {text!r}"
        images = int(re.search(r'data-images="(\d+)"', dom).group(1))
        assert images >= 3, page
        assert 'data-broken-images="0"' in dom, f"{page} has images that did not load"
        assert not _js_errors(run.stderr), _js_errors(run.stderr)
    # the check sees a JavaScript error when there is one (a control page)
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    assert _js_errors(_chromium(["--dump-dom", bad.as_uri()]).stderr)


@needs_chromium
def test_index_sorts_by_a_descriptor_in_the_browser(site, tmp_path):
    """Clicking the centre_x header sorts the classes by it (smallest first, then largest)."""
    page = site / "sorted.html"
    text = (site / "index.html").read_text()
    click = ("<script>window.addEventListener('load',function(){var t=document.getElementById("
             "'classes');var h=[].slice.call(t.tHead.rows[0].cells).filter(function(c){return "
             "c.textContent==='centre_x'})[0];h.click();document.body.setAttribute('data-first',"
             "t.tBodies[0].rows[0].cells[0].textContent);h.click();document.body.setAttribute("
             "'data-last-first',t.tBodies[0].rows[0].cells[0].textContent);});</script>")
    page.write_text(text.replace("</body>", click + "</body>"))
    dom = _chromium(["--dump-dom", page.as_uri()]).stdout
    assert 'data-first="9"' in dom  # class 9 looks left: the smallest centre_x
    assert 'data-last-first="9"' not in dom


@needs_chromium
def test_screenshot_of_the_index(site, tmp_path):
    shot = tmp_path / "index.png"
    run = _chromium([f"--screenshot={shot}", "--window-size=1280,900", (site / "index.html").as_uri()])
    assert run.returncode == 0 and shot.is_file()
    with Image.open(shot) as im:
        assert im.size == (1280, 900)
        # not a blank page: the mean-map thumbnails put colour on it
        colours = np.asarray(im.convert("RGB").resize((64, 45))).reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 50


def test_comparison_page_names_both_sides(site):
    """Cards say which store (and method) each map comes from, not "this store"/"the other";
    within one store they name the two methods."""
    from pipeline.analysis.atlas import compare_labels
    from pipeline.analysis.reader import open_reader

    text = (site / "compare.html").read_text()
    assert "this store" not in text and "the other" not in text
    r = open_reader(str(site.parent / "s.zarr"))
    assert f"s.zarr ({r.primary}): Spearman" in text and f"shifted.zarr ({r.primary})" in text
    assert compare_labels(r, r, "maps", "methods/gradcam") == (r.primary, "gradcam")


def test_boxes_score_the_rows_and_show_in_the_atlas(site):
    from pipeline.analysis.reader import open_reader

    res = open_reader(str(site.parent / "s.zarr")).analysis()
    table = {r["class"]: r for r in res.class_table()}
    assert table[8]["energy_in_box"] > 0.4 > table[9]["energy_in_box"]
    assert table[8]["max_in_box"] > 0.9 and table[8]["box_iou"] > table[9]["box_iou"]
    assert "energy_in_box" in (site / "index.html").read_text()


def test_failed_rows_are_listed(site):
    index = (site / "index.html").read_text()
    assert f">{FAILED_ROW}<" in index and "CORRUPT" in index
    assert BAD_MAP_ROW != FAILED_ROW
