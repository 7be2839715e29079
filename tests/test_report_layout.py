"""The HTML reports at 1280 px in real headless Chromium (issue 26 item 8): no horizontal scroll, no table
cut off (the inspect report with --trace, the scan report), measured by element geometry; and the scan
report's figures without overlapping tick labels or a legend over a bar, measured from matplotlib's own
text and patch extents (not pixels)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from _scan_fixtures import FIX
from nanscope.cli import main
from test_report_html import _run

WIDTH = 1280

GEOMETRY = """<script>
window.addEventListener('load', function () {
  var W = document.documentElement.clientWidth, out = {width: W, over: [], clipped: []};
  out.scroll_width = document.documentElement.scrollWidth;
  function name(el) { return el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
                             (el.className && el.className.baseVal === undefined ? '.' + el.className : ''); }
  document.querySelectorAll('body *').forEach(function (el) {
    var r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > W + 0.5) out.over.push(name(el) + ' right=' + Math.round(r.right));
    if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== 'visible' &&
        el.tagName !== 'PRE' && el.clientWidth > 0)
      out.clipped.push(name(el) + ' ' + el.scrollWidth + '>' + el.clientWidth);
  });
  out.over = out.over.slice(0, 15);
  out.clipped = out.clipped.slice(0, 15);
  out.tables = Array.prototype.map.call(document.querySelectorAll('table'), function (t) {
    return {cls: t.className, right: Math.round(t.getBoundingClientRect().right)}; });
  var pre = document.createElement('pre');
  pre.id = 'nanscope-geometry';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def geometry(page: Path, tmp: Path) -> dict:
    """Open the report at 1280 px wide in headless Chromium; what the page script measured."""
    probed = tmp / (page.stem + ".geometry.html")
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"script-src[^;\"]*", "", text)  # the probe is inline
    text = text.replace('content="', "content=\"script-src 'unsafe-inline'; ", 1) if "Content-Security-Policy" in text \
        else text
    probed.write_text(text.replace("<head>", "<head>" + GEOMETRY, 1), encoding="utf-8")
    dom = _run([f"--window-size={WIDTH},2000", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()], tmp,
               page.stem + "-geometry")
    m = re.search(r'<pre id="nanscope-geometry">(.*?)</pre>', dom.stdout, re.S)
    assert m, f"chromium returned no geometry (exit {dom.returncode}): {dom.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


def _assert_fits(seen: dict) -> None:
    assert seen["width"] == WIDTH - 0 or seen["width"] <= WIDTH, seen["width"]
    assert seen["scroll_width"] <= seen["width"], f"horizontal scroll: {seen}"
    assert seen["over"] == [], seen["over"]
    assert seen["clipped"] == [], seen["clipped"]
    assert all(t["right"] <= seen["width"] for t in seen["tables"]), seen["tables"]


def test_inspect_report_with_trace_fits_1280_px(demo_files, tmp_path):
    page = tmp_path / "trace.html"
    code = main(["inspect", str(demo_files.checkpoint), str(demo_files.batch), "--config", str(demo_files.config),
                 "--criterion", "nanscope.criterion:NaiveCriterion", "--trace", "--html", str(page), "--quiet"])
    assert code == 1 and 'id="trace"' in page.read_text()
    _assert_fits(geometry(page, tmp_path))


def test_scan_report_fits_1280_px(tmp_path):
    page = tmp_path / "scan.html"
    code = main(["scan", str(FIX / "od.jsonl"), "--label-map", str(FIX / "label_map.json"), "--text-encoder",
                 str(FIX / "text_encoder"), "--html", str(page), "--quiet"])
    assert code in (0, 1)
    _assert_fits(geometry(page, tmp_path))


# ---------------------------------------------------------------- the scan figures, by matplotlib's extents


@pytest.fixture(scope="module")
def scan_tables(tmp_path_factory):
    """The histograms and per-code rows of real scans of the fixtures (detection and grounding data)."""
    out = {}
    for name, extra in (("od", ["--label-map", str(FIX / "label_map.json")]), ("vg", []), ("coco", [])):
        data = FIX / ("coco.json" if name == "coco" else f"{name}.jsonl")
        path = tmp_path_factory.mktemp("scan_fig") / "r.json"
        code = main(["scan", str(data), *extra, "--text-encoder", str(FIX / "text_encoder"), "--json", str(path),
                     "--quiet"])
        assert code in (0, 1)
        out[name] = json.loads(path.read_text())["tables"]
    return out


def _figures(tables: dict) -> list:
    from nanscope.scan import figures

    hist = tables["histograms"]
    figs = [figures.tokens_figure(hist["tokens"], 256), figures.boxes_figure(hist["boxes_per_image"]),
            figures.box_sizes_figure(hist["box_size"])]
    if tables.get("codes"):
        figs.append(figures.codes_figure(tables["codes"]))
    return figs


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 - 0.5 and b.x0 < a.x1 - 0.5 and a.y0 < b.y1 - 0.5 and b.y0 < a.y1 - 0.5


def _check_figures(tables: dict) -> int:
    """Assert no tick labels overlap and no legend covers a bar or its value; the number of legend/bar pairs
    measured (so a caller can tell the check was not vacuous)."""
    import matplotlib.pyplot as plt

    measured = 0
    for fig in _figures(tables):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        title = ax.get_title()
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    assert not _overlap(boxes[i], boxes[j]), \
                        f"{title}: tick labels {labels[i].get_text()!r} and {labels[j].get_text()!r} overlap"
        legend = ax.get_legend()
        if legend is not None:
            lb = legend.get_window_extent(renderer)
            bars = [p for p in ax.patches if p.get_height() and p.get_width()]
            for p in bars:
                assert not _overlap(lb, p.get_window_extent(renderer)), f"{title}: the legend covers a bar"
                measured += 1
            for t in ax.texts:  # the value written at each bar's end
                assert not _overlap(lb, t.get_window_extent(renderer)), f"{title}: the legend covers {t.get_text()!r}"
        plt.close(fig)
    return measured


@pytest.mark.parametrize("name", ["od", "vg", "coco"])
def test_scan_figures_have_no_overlapping_tick_labels_and_no_legend_over_a_bar(scan_tables, name):
    _check_figures(scan_tables[name])


def test_the_legend_never_covers_a_bar_whatever_the_counts(scan_tables):
    """Counts where any legend inside the axes would sit on a bar: the longest bars where a legend goes."""
    rows = [dict(r) for r in scan_tables["od"]["codes"]] or [{"code": "NS102", "title": "cut", "severity": "error"}]
    rows = [{**r, "samples": 5 + k} for k, r in enumerate(rows)]
    rows.append({"code": "NS204", "title": "image without boxes", "severity": "warning", "samples": 950})
    rows.append({"code": "NS306", "title": "info", "severity": "info", "samples": 900})
    hist = dict(scan_tables["od"]["histograms"])
    full = {k: dict(v) for k, v in hist.items()}
    for h in full.values():  # every bin as tall as the tallest: no empty corner anywhere
        h["counts"] = [1000] * len(h["counts"])
    assert _check_figures({"histograms": full, "codes": rows}) > 0  # legends and bars were measured
    for h in full.values():  # counts over three decades: the log axes
        h["counts"] = [1 if k % 2 else 1000 for k in range(len(h["counts"]))]
    assert _check_figures({"histograms": full, "codes": rows}) > 0
