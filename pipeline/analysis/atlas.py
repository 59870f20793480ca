"""``unioncam atlas``: a static website to browse a store's analysis.

Why static: the atlas must open from ``file://`` on a laptop, a cluster's shared disk or
an artefact store, with no server and no network; so every page is plain HTML with its
CSS and JavaScript inline, and every image is a PNG beside it, linked by a relative path.

Pages (``OUT/``):

* ``index.html``: the store and its analysis at a glance; a table of groups and a table
  of classes, each sortable by any column (click a header), with mean-map thumbnails;
  the Clever-Hans ranking is the groups table sorted by its column.
* ``group-<name>.html``: one per group (per class when classes are analysed alone): the
  mean map, each strategy's centroid with its share of the rows and exemplar overlays on
  the original photos, the rows that look most off-object (most mass on the border
  band), the classes in the group, and the group's failed rows with their errors.
* ``compare.html`` when the store holds a comparison: classes by agreement (least first)
  and the rows that disagree most, both maps side by side.

Overlays are drawn on the original photos found through the manifest recorded in the
store (as ``unioncam query maps --overlay`` does); a photo that cannot be read is shown
as the map alone, with the reason in its caption.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline.analysis.descriptors import DESCRIPTOR_TITLES, DESCRIPTORS
from pipeline.analysis.images import colorize
from pipeline.analysis.reader import StoreReader
from pipeline.analysis.status import store_status
from pipeline.data.classes import class_name, load_class_names
from pipeline.data.decode import Status
from pipeline.store.names import status_name, text

__all__ = ["AtlasSite", "compare_labels", "write_atlas"]

#: Failed rows listed per group page (the rest are counted).
MAX_FAILED = 50
#: Rows shown on the comparison page.
COMPARE_ROWS = 6
THUMB_PX = 96
LARGE_PX = 192

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em}
.meta{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.85em}
th,td{border-bottom:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:middle}
th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td.l,th.l{text-align:left}
img.t{width:48px;height:48px;image-rendering:auto;display:block}
.cards{display:flex;flex-wrap:wrap;gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;background:#fafafa}
.card img{display:block;max-width:260px;max-height:220px}
.card .cap{font-size:.8em;color:#444;max-width:260px;margin-top:4px}
.strategy{border-left:4px solid #36c;padding-left:10px;margin:10px 0}
.ch{color:#b00;font-weight:bold}
a{color:#2458b3}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(table){
  var heads = table.querySelectorAll('th');
  heads.forEach(function(th, col){
    th.addEventListener('click', function(){
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = !th.classList.contains('sorted-asc');
      heads.forEach(function(h){ h.classList.remove('sorted-asc','sorted-desc'); });
      th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
      rows.sort(function(a, b){
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        if (isNaN(nx) !== isNaN(ny)) { c = isNaN(nx) ? 1 : -1; return c; }
        return asc ? c : -c;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
window.addEventListener('load', function(){
  var broken = Array.prototype.filter.call(document.images, function(i){
    return !i.complete || i.naturalWidth === 0; });
  document.body.setAttribute('data-images', document.images.length);
  document.body.setAttribute('data-broken-images', broken.length);
});
"""


@dataclass
class AtlasSite:
    """What :func:`write_atlas` wrote."""

    index: Path
    pages: int
    images: int


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return s or "group"


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return _e(v)
    return "–" if np.isnan(x) else f"{x:.{digits}f}"


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n{body}\n"
            f"<script>{_SORT_JS}</script></body></html>\n")  # fmt: skip


class _Images:
    """Writes the PNGs under ``img/`` and hands back their relative paths."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "img"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def map_png(self, name: str, m: np.ndarray, px: int) -> str:
        from PIL import Image

        m = np.asarray(m, dtype=np.float32)
        if np.isfinite(m).any() and np.nanmax(m) > 0:
            m = m / np.nanmax(m)  # a mean map is shown scaled to its maximum
        img = Image.fromarray(colorize(m)).resize((px, px), Image.Resampling.BILINEAR)
        return self._save(name, img)

    def _save(self, name: str, img: Any) -> str:
        path = self.dir / f"{name}.png"
        # zlib level 1: 1.7 ms against 5.1 ms a 160-px card at level 6, 25 % more bytes
        # (measured); a 1,000-group atlas writes ~16,000 of them
        img.save(path, format="PNG", compress_level=1)
        self.count += 1
        return f"img/{path.name}"

    def overlay(self, reader: StoreReader, row: int, manifest: str | None,
                crop_box: tuple[int, ...], m: np.ndarray, tag: str = "") -> tuple[str, str]:
        """``(relative path, problem)``: the row's map ``m`` on its photo (``crop_box``: the
        row's stored crop), or the map alone with the reason the photo could not be shown.
        The caller reads the rows' fields and maps in bulk: a ``reader.row`` per overlay
        was ~35 ms, most of the atlas's time for 1,000 groups."""
        from PIL import Image

        from pipeline.analysis.images import overlay_image

        try:
            image = reader.original_image(row, manifest=manifest)
            img = overlay_image(image, m, crop_box)
            img.thumbnail((260, 220))
            return self._save(f"row-{row:07d}{tag}", img), ""
        except Exception as e:  # the photo is gone or unreadable: the map still tells
            problem = " ".join(str(e).split())[:160]
            img = Image.fromarray(colorize(m)).resize((160, 160), Image.Resampling.BILINEAR)
            return self._save(f"row-{row:07d}{tag}-map", img), problem


class _Rows:
    """The per-row fields the atlas shows (target, crop box), read as whole columns once."""

    def __init__(self, reader: StoreReader) -> None:
        self.rows, cols = reader.read_columns(["target", "crop_box"])
        self.target, self.crop_box = cols["target"], cols["crop_box"]

    def _at(self, row: int) -> int:
        i = int(np.searchsorted(self.rows, row))
        if i >= len(self.rows) or self.rows[i] != row:
            raise ValueError(f"row {row} is not in a finished unit")
        return i

    def target_of(self, row: int) -> int:
        return int(self.target[self._at(row)])

    def crop_box_of(self, row: int) -> tuple[int, ...]:
        return tuple(int(v) for v in self.crop_box[self._at(row)])


def _card(src: str, caption: str, problem: str = "") -> str:
    note = f"<br><i>photo not shown: {_e(problem)}</i>" if problem else ""
    return (f'<div class="card"><img src="{_e(src)}" alt="{_e(caption)}">'
            f'<div class="cap">{caption}{note}</div></div>')  # fmt: skip


def _failed_rows(reader: StoreReader) -> list[tuple[int, int, str, str, str]]:
    """(row, class, status, file, error) of every failed row of the finished units (the
    file from the store's per-row ``uri`` when it has one)."""
    names = ["status", "target", "label", "error"] + (["uri"] if "uri" in reader.group else [])
    out = []
    for start, a in reader.iter_units(names):
        bad = np.nonzero(a["status"] != int(Status.OK))[0]
        for i in bad.tolist():
            st = int(a["status"][i])
            c = int(a["target"][i]) if int(a["target"][i]) >= 0 else int(a["label"][i])
            err, uri = (text(a[k][i]) if k in a else "" for k in ("error", "uri"))
            name = status_name(st)
            out.append((start + i, c, name, uri, err))
    return out


def write_atlas(reader: StoreReader, out: str | Path, *, manifest: str | None = None,
                exemplars: int = 4) -> AtlasSite:  # fmt: skip
    """Write the site for ``reader``'s store into ``out`` (see the module docstring)."""
    res = reader.analysis()
    if res is None:
        raise ValueError(f"{reader.path} has no analysis yet: run 'unioncam analyze "
                         f"{reader.path}' first")  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    imgs = _Images(out)
    names = load_class_names()
    classes = res.class_table()
    groups = res.group_table()
    failed = _failed_rows(reader)
    group_of = {r["class"]: r["group"] for r in classes}
    pages = 0
    # ---------------------------------------------------------------- group pages
    group_thumb: dict[str, str] = {}
    rows_info = _Rows(reader)

    def cards_of(rows: list[int]) -> list[str]:
        """Overlay cards of ``rows``, their maps read in one call."""
        maps = reader.maps(rows) if rows else []
        out = []
        for r, m in zip(rows, maps, strict=True):
            src, problem = imgs.overlay(reader, r, manifest, rows_info.crop_box_of(r), m)
            c = rows_info.target_of(r)
            out.append(_card(src, f"row {r}: {_e(class_name(names, c))}", problem))
        return out

    for g, st in zip(groups, res.all_strategies(), strict=True):
        name = g["group"]
        slug = _slug(name)
        group_thumb[name] = imgs.map_png(f"mean-group-{slug}", st.mean_map, THUMB_PX)
        large = imgs.map_png(f"mean-group-{slug}-large", st.mean_map, LARGE_PX)
        title = _group_title(name, st.classes, names)
        nc = len(st.classes)
        body = ['<p><a href="index.html">&larr; all groups and classes</a></p>',
                f"<h1>{_e(title)}</h1>",
                f'<p class="meta">{st.count} rows described, {nc} class{"es" if nc != 1 else ""}; '
                f"{st.k} strateg{'y' if st.k == 1 else 'ies'}"
                + (f" (silhouette {st.silhouette:.3f})" if st.k > 1 else
                   " (no split reached a silhouette of 0.5)")
                + f"; Clever-Hans score <span class=\"ch\">{st.clever_hans:.3f}</span></p>",
                '<h2>Mean map</h2><div class="cards">'
                + _card(large, f"mean of {st.count} maps (scaled to its maximum)") + "</div>",
                "<h2>Strategies</h2>"]  # fmt: skip
        for j in range(st.k):
            share = st.sizes[j] / max(sum(st.sizes), 1)
            cen = imgs.map_png(f"centroid-{slug}-{j}", st.centroids[j], LARGE_PX // 2 + 32)
            flag = " <span class=\"ch\">Clever-Hans candidate</span>" \
                if j == st.clever_hans_strategy else ""  # fmt: skip
            cards = [_card(cen, f"centroid of strategy {j}"),
                     *cards_of(st.exemplars[j][:exemplars])]
            body.append(f'<div class="strategy"><h3>strategy {j}: {st.sizes[j]} rows '
                        f"({share:.0%}){flag}</h3><div class=\"cards\">{''.join(cards)}</div></div>")
        body.append("<h2>Most off-object rows</h2><p class=\"meta\">the rows whose map puts "
                    "the most mass on the border band (10 % of the side along each edge)</p>")
        cards = cards_of(st.off_object)
        body.append(f'<div class="cards">{"".join(cards) or "none"}</div>')
        rows = [r for r in classes if r["group"] == name]
        body.append("<h2>Classes</h2>" + _class_table(rows, names, {}, link=False))
        gfailed = [f for f in failed if group_of.get(f[1]) == name]
        body.append(f"<h2>Failed rows ({len(gfailed)})</h2>" + _failed_table(gfailed, names))
        (out / f"group-{slug}.html").write_text(_page(f"{title} – unioncam atlas",
                                                       "\n".join(body)), encoding="utf-8")
        pages += 1
    # ---------------------------------------------------------------- class thumbnails
    class_thumb = {c: imgs.map_png(f"mean-class-{c:05d}", m, THUMB_PX)
                   for c, m in res.class_mean_maps().items()}
    # ---------------------------------------------------------------- comparison page
    has_compare = res.compare is not None
    if has_compare:
        _compare_page(reader, res, out, imgs, names, manifest, rows_info)
        pages += 1
    # ---------------------------------------------------------------- index
    st = store_status(reader)
    a = reader.attrs
    cover = ("every unit" if res.complete else
             f"{len(res.attrs.get('units', []))} of {reader.num_units} units "
             "(the run was not finished when it was analysed)")  # fmt: skip
    counts = res.attrs.get("counts", {})
    body = [
        "<h1>unioncam atlas</h1>",
        f'<p class="meta">store {_e(reader.path)}; model {_e(a.get("model", "?"))}, layer '
        f'{_e(a.get("layer", "?"))}, maps {reader.map_size} px; {st.rows_done} of '
        f"{reader.num_rows} rows written. Analysis of {cover}: {counts.get('described', 0)} "
        f"rows described, {counts.get('no_map', 0)} without a map, "
        f"{counts.get('bad_map', 0)} with a bad map; grouping {_e(res.attrs.get('grouping'))}."
        "</p>",
        '<p class="meta">Click a column header to sort. Descriptors: '
        + "; ".join(f"<b>{d}</b> = {_e(t)}" for d, t in DESCRIPTOR_TITLES.items())
        + ". Clever-Hans score: how far the most distant minority strategy (at least 5 % of "
        "the rows) stands from the majority, 1 - cos of their centroids.</p>",
    ]
    if has_compare:
        body.append('<p><a href="compare.html">Comparison with '
                    f'{_e(res.compare.attrs.get("other"))}</a></p>')
    body.append(f"<h2>Groups ({len(groups)})</h2>")
    gh = ["group", "mean map", "rows", "k", "clever_hans", *DESCRIPTORS]
    trs = []
    for g in groups:
        cells = [f'<td class="l" data-v="{_e(g["group"])}"><a href="group-{_slug(g["group"])}'
                 f'.html">{_e(g["group"])}</a></td>',
                 f'<td data-v="0"><img class="t" src="{group_thumb[g["group"]]}" '
                 f'alt="mean map of {_e(g["group"])}"></td>',
                 f'<td data-v="{g["count"]}">{g["count"]}</td>',
                 f'<td data-v="{g["k"]}">{g["k"]}</td>',
                 f'<td data-v="{g["clever_hans"]}">{_num(g["clever_hans"])}</td>']  # fmt: skip
        cells += [f'<td data-v="{g[d]}">{_num(g[d])}</td>' for d in DESCRIPTORS]
        trs.append(f"<tr>{''.join(cells)}</tr>")
    body.append(_table(gh, trs, "groups"))
    body.append(f"<h2>Classes ({len(classes)})</h2>")
    body.append(_class_table(classes, names, class_thumb, link=True))
    if failed:
        body.append(f"<h2>Failed rows ({len(failed)})</h2>" + _failed_table(failed, names))
    (out / "index.html").write_text(_page("unioncam atlas", "\n".join(body)), encoding="utf-8")
    pages += 1
    (out / "atlas.json").write_text(json.dumps({"store": reader.path, "groups": len(groups),
                                                "classes": len(classes)}), encoding="utf-8")
    return AtlasSite(index=out / "index.html", pages=pages, images=imgs.count)


def _group_title(name: str, classes: list[int], names: list[str]) -> str:
    """A group's heading: a class analysed alone is named as a class."""
    if name.isdigit() and classes == [int(name)]:
        return f"class {name}: {class_name(names, int(name))}"
    return name


def _table(heads: list[str], rows: list[str], ident: str) -> str:
    th = "".join(f'<th class="{"l" if i == 0 or h in ("name", "group") else ""}">{_e(h)}</th>'
                 for i, h in enumerate(heads))  # fmt: skip
    return (f'<table class="sortable" id="{ident}"><thead><tr>{th}</tr></thead><tbody>'
            + "\n".join(rows) + "</tbody></table>")


def _class_table(rows: list[dict[str, Any]], names: list[str], thumbs: dict[int, str],
                 link: bool) -> str:  # fmt: skip
    extra = [k for k in ("energy_in_box", "max_in_box", "box_iou", "spearman", "top_iou")
             if rows and k in rows[0]]
    heads = ["class", "name", "group", *(["mean map"] if thumbs else []), "rows", *DESCRIPTORS,
             *extra]
    trs = []
    for r in rows:
        g = _e(r["group"])
        gcell = f'<a href="group-{_slug(r["group"])}.html">{g}</a>' if link else g
        cells = [f'<td class="l" data-v="{r["class"]}">{r["class"]}</td>',
                 f'<td class="l" data-v="{_e(class_name(names, r["class"]))}">'
                 f'{_e(class_name(names, r["class"]))}</td>',
                 f'<td class="l" data-v="{g}">{gcell}</td>']  # fmt: skip
        if thumbs:
            src = thumbs.get(r["class"], "")
            cells.append(f'<td data-v="0"><img class="t" src="{src}" alt="mean map of class '
                         f'{r["class"]}"></td>' if src else '<td data-v="0"></td>')
        cells.append(f'<td data-v="{r["count"]}">{r["count"]}</td>')
        cells += [f'<td data-v="{r[d]}">{_num(r[d])}</td>' for d in (*DESCRIPTORS, *extra)]
        trs.append(f"<tr>{''.join(cells)}</tr>")
    return _table(heads, trs, "classes")


def _failed_table(rows: list[tuple[int, int, str, str, str]], names: list[str]) -> str:
    if not rows:
        return "<p>none</p>"
    trs = [f'<tr><td data-v="{r}">{r}</td><td class="l" data-v="{c}">'
           f"{_e(class_name(names, c) if c >= 0 else '(no class)')}</td>"
           f'<td class="l" data-v="{_e(s)}">{_e(s)}</td><td class="l" data-v="{_e(u)}">'
           f'{_e(u)}</td><td class="l" data-v="{_e(e)}">{_e(e)}</td></tr>'
           for r, c, s, u, e in rows[:MAX_FAILED]]  # fmt: skip
    more = f"<p>and {len(rows) - MAX_FAILED} more</p>" if len(rows) > MAX_FAILED else ""
    return _table(["row", "class", "status", "file", "error"], trs, "failed") + more


def compare_labels(reader: StoreReader, other: StoreReader | None, maps_a: str, maps_b: str
                   ) -> tuple[str, str]:  # fmt: skip
    """What the two sides of a comparison are called: their methods (``unioncam``,
    ``gradcam``) within one store, the stores' names (with the method) across two."""
    def method(r: StoreReader | None, path: str) -> str:
        if path == "maps":
            return r.primary if r is not None else "maps"
        return path.split("/", 1)[-1]

    a, b = method(reader, maps_a), method(other, maps_b)
    if other is not None and other.path == reader.path:
        return a, b
    na = PurePosixPath(reader.path.rstrip("/")).name
    nb = PurePosixPath((other.path if other is not None else "other").rstrip("/")).name
    if na == nb:  # two runs/x/s.zarr: name them by their folders
        na = "/".join(PurePosixPath(reader.path.rstrip("/")).parts[-2:])
        nb = "/".join(PurePosixPath(other.path.rstrip("/")).parts[-2:]) if other else nb
    return f"{na} ({a})", f"{nb} ({b})"


def _compare_page(reader: StoreReader, res: Any, out: Path, imgs: _Images, names: list[str],
                  manifest: str | None, rows_info: _Rows) -> None:  # fmt: skip
    from pipeline.analysis.reader import open_reader

    at = dict(res.compare.attrs)
    table = sorted((r for r in res.class_table() if np.isfinite(r.get("spearman", np.nan))),
                   key=lambda r: (r["spearman"], r["class"]))  # fmt: skip
    rho = np.asarray(res.compare["spearman"][:])
    finite = np.nonzero(np.isfinite(rho))[0]
    worst = finite[np.argsort(rho[finite], kind="stable")][:COMPARE_ROWS].tolist()
    maps_a, maps_b = at.get("maps", ["maps", "maps"])
    body = ['<p><a href="index.html">&larr; all groups and classes</a></p>',
            "<h1>Comparison</h1>",
            f'<p class="meta">{_e(reader.path)} ({_e(maps_a)}) against {_e(at.get("other"))} '
            f'({_e(maps_b)}): {at.get("rows_compared")} rows compared; mean Spearman '
            f'{_num(at.get("spearman_mean"))}, mean IoU of the top 15 % '
            f'{_num(at.get("top_iou_mean"))}. Classes that differ most first.</p>']  # fmt: skip
    try:
        other = reader if at.get("other") == reader.path else open_reader(str(at.get("other")))
    except Exception:
        other = None
    label_a, label_b = compare_labels(reader, other, maps_a, maps_b)
    cards = []
    for r in worst:
        a_map = np.asarray(reader.group[maps_a][r], dtype=np.float32)
        box = rows_info.crop_box_of(r)
        src, problem = imgs.overlay(reader, r, manifest, box, a_map, "-a")
        c = rows_info.target_of(r)
        cards.append(_card(src, f"row {r} ({_e(class_name(names, c))}), {_e(label_a)}: "
                                f"Spearman {rho[r]:.3f}", problem))  # fmt: skip
        if other is not None:
            b_map = np.asarray(other.group[maps_b][r], dtype=np.float32)
            src, problem = imgs.overlay(reader, r, manifest, box, b_map, "-b")
            cards.append(_card(src, f"row {r}, {_e(label_b)}", problem))
    body.append("<h2>Rows that disagree most</h2>"
                f'<div class="cards">{"".join(cards) or "none"}</div>')
    trs = [f'<tr><td class="l" data-v="{r["class"]}">{r["class"]}</td><td class="l" '
           f'data-v="{_e(class_name(names, r["class"]))}">{_e(class_name(names, r["class"]))}'
           f'</td><td data-v="{r["spearman"]}">{_num(r["spearman"])}</td><td '
           f'data-v="{r["top_iou"]}">{_num(r["top_iou"])}</td></tr>' for r in table]  # fmt: skip
    body.append("<h2>Classes by agreement</h2>"
                + _table(["class", "name", "spearman", "top_iou"], trs, "agreement"))
    (out / "compare.html").write_text(_page("comparison – unioncam atlas", "\n".join(body)),
                                      encoding="utf-8")
