"""The HTML report, rendered by a real browser (headless Chromium from Debian: `apt-get install -y chromium`).

A copy of each report gets a small script that records JavaScript errors, console errors, CSP
violations, network requests and every image's natural size into a <pre id="nanscope-test">, which
`--dump-dom` reads back. A screenshot of each report lands in test-artifacts/ (gitignored).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from _report_demo import demo_json
from nanscope.findings import Finding, Severity
from nanscope.report.html import CSP, render_html
from nanscope.report.json_io import read_result
from nanscope.result import Check, Result

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars"]

PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    var t = e.target;
    errors.push(t && t !== window && (t.src || t.href) ? 'failed to load ' + (t.src || t.href).slice(0, 80)
                                                        : 'js error: ' + e.message);
  }, true);
  document.addEventListener('securitypolicyviolation', function (e) {
    errors.push('csp violation: ' + e.violatedDirective + ' ' + e.blockedURI);
  });
  var oldError = console.error;
  console.error = function () { errors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
                                oldError.apply(console, arguments); };
  window.addEventListener('load', function () {
    var out = {
      errors: errors,
      images: Array.prototype.map.call(document.images, function (i) {
        return {alt: i.alt, width: i.naturalWidth, height: i.naturalHeight, complete: i.complete}; }),
      codes: Array.prototype.map.call(document.querySelectorAll('table.findings td.code'),
                                      function (td) { return td.textContent; }),
      effects: Array.prototype.map.call(document.querySelectorAll('table.findings tr.effect td.code'),
                                        function (td) { return td.textContent; }),
      groups: Array.prototype.map.call(document.querySelectorAll('table.findings tbody'),
                                       function (b) { return b.querySelectorAll('tr').length; }),
      causes: document.querySelectorAll('#verdict ol.causes li').length,
      checks: document.querySelectorAll('table.checks tbody tr').length,
      verdict: (document.getElementById('verdict') || {}).textContent || null,
      requests: performance.getEntriesByType('resource').map(function (r) { return r.name; })
                  .filter(function (n) { return n.indexOf('data:') !== 0; }),
      sections: Array.prototype.map.call(document.querySelectorAll('h2'), function (h) { return h.id; })
    };
    var pre = document.createElement('pre');
    pre.id = 'nanscope-test';
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  });
})();
</script>"""


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed to test the HTML report and was not found on PATH; install it with "
                "`apt-get update && apt-get install -y chromium` (.ci/run does this)")


def _run(args: list[str], tmp: Path, name: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{name}"
    cmd = [_browser(), *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def browse(report: str, tmp: Path, name: str) -> dict:
    """Open `report` in headless Chromium; return what the probe saw. Saves test-artifacts/<name>.png."""
    assert f'content="{CSP}"' in report, "the report must carry its Content-Security-Policy"
    # let the probe (and only inline scripts) run in the copy; images and requests stay as restricted
    probed = report.replace(f'content="{CSP}"', f'content="{CSP}; script-src \'unsafe-inline\'"', 1)
    probed = probed.replace("<head>", "<head>" + PROBE, 1)
    page, copy = tmp / f"{name}.html", tmp / f"{name}.probe.html"
    page.write_text(report, encoding="utf-8")
    copy.write_text(probed, encoding="utf-8")
    dom = _run(["--virtual-time-budget=5000", "--dump-dom", copy.as_uri()], tmp, name + "-dom")
    m = re.search(r'<pre id="nanscope-test">(.*?)</pre>', dom.stdout, re.S)
    assert m, f"chromium returned no probe output (exit {dom.returncode}): {dom.stderr[-2000:]}"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    _run([f"--screenshot={shot}", "--window-size=1400,3000", page.as_uri()], tmp, name + "-shot")
    assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot written to {shot}"
    return json.loads(html.unescape(m.group(1)))


@pytest.fixture(scope="module")
def demo(demo_files, tmp_path_factory) -> Result:
    return read_result(demo_json(demo_files, tmp_path_factory))  # JSON + sidecar, as `nanscope report` reads it


def test_demo_report_in_chromium(demo, tmp_path):
    seen = browse(render_html(demo), tmp_path, "report-inspect-demo")
    assert seen["errors"] == [] and seen["requests"] == []
    # one heatmap per image in artifacts["heatmaps"] (worst image, and the one where padding shows) + counts
    assert len(seen["images"]) == len(demo.artifacts["heatmaps"]) + 1
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in seen["images"]), seen["images"]
    assert seen["codes"] == [f.code for f in demo.findings]
    assert {"NS102", "NS101", "NS001", "NS104"} <= set(seen["codes"])
    assert seen["verdict"].startswith("BROKEN")
    # grouped by cause: the caption with the three findings it explains, the padding with the NaN loss
    assert seen["causes"] == len(seen["groups"]) == 2 and seen["groups"] == [4, 2]
    assert seen["effects"] == ["NS102", "NS103", "NS203", "NS001"]
    assert {"findings", "heatmap", "nonfinite", "environment", "inputs"} <= set(seen["sections"])


def _verify_result() -> Result:
    trace = Finding("NS301", Severity.ERROR, 1, "NaN first appears in the forward at sigmoid_focal_loss",
                    ({"phase": "forward", "module": "(loss code)", "op": "log", "file": "train.py", "line": 42,
                      "kind": "nan"},),
                    data={"origins": [{"phase": "forward", "op": "aten.log.default", "function": "focal",
                                       "shape": [2, 900, 256], "dtype": "torch.float32"}]})
    return Result(
        kind="verify-fix", findings=[trace],
        checks=[Check(1, "before reproduces the bug", True, "loss_ce is nan"),
                Check(3, "after's gradients are finite", False, "2 parameters have NaN gradients",
                      {"nonfinite_params": 2}),
                Check(8, "training steps with after stay finite", True, "1.5 -> 1.1")],
        tables={"terms": [{"term": "loss_ce", "layer": "dec0", "before": "nan", "after": 0.42},
                          {"term": "loss_bbox", "layer": "dec0", "before": 0.7, "after": 0.7},
                          {"term": "total (weighted)", "layer": "all", "before": "nan", "after": 3.1}],
                "steps": [{"step": 0, "before": "nan", "after": 1.5}, {"step": 1, "before": None, "after": 1.3},
                          {"step": 2, "before": None, "after": 1.1}],
                "memory": {"method": "tracemalloc", "before_bytes": 1000, "after_bytes": 1100, "ratio": 1.1}},
        environment={"torch": torch.__version__, "device": "cpu"},
        inputs={"checkpoint": "ck.pth", "checkpoint_sha256": "0" * 64})


def test_verify_fix_report_in_chromium(tmp_path):
    r = _verify_result()
    page = render_html(r)
    seen = browse(page, tmp_path, "report-verify-fix")
    assert seen["errors"] == [] and seen["requests"] == []
    assert len(seen["images"]) == 2 and all(i["width"] > 0 for i in seen["images"])  # terms and steps charts
    assert seen["checks"] == len(r.checks)
    assert seen["verdict"].startswith("NOT FIXED")
    assert {"checks", "trace", "terms", "steps", "table-memory", "environment"} <= set(seen["sections"])
    assert "train.py:42 in focal" in page and "(loss code)" in page


def test_user_text_is_escaped():
    evil = "<script>alert(1)</script>"
    r = Result(kind="inspect",
               findings=[Finding("NS102", Severity.ERROR, 1, f"phrase {evil} cut", ({"phrase": evil, "image": 0},))],
               inputs={"caption": evil}, summary={"criterion": evil},
               artifacts={"image": 0, "layer": "dec0", "logits": torch.zeros(4, 8), "text_mask": torch.ones(8).bool(),
                          "positive_map": torch.zeros(1, 8), "tokens": [evil] * 8, "num_tokens": 8,
                          "phrases": [evil], "inf_per_layer": {"dec0": 0}, "nan_per_layer": {"dec0": 0}})
    page = render_html(r)
    assert "<script" not in page.lower()
    assert html.escape(evil) in page


def test_self_contained_and_robust_to_missing_parts():
    for r in (Result(kind="inspect"), Result(kind="verify-fix"), Result(kind="verify-fix", tables={"terms": "bad"}),
              Result(kind="watch", summary={"ranks": {"1": {"origin": True}}, "origin_ranks": [1]})):
        page = render_html(r)
        assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
        assert "<script" not in page
    assert "No findings." in render_html(Result(kind="inspect"))
    assert "Origin rank(s): <strong>[1]</strong>" in render_html(
        Result(kind="watch", summary={"ranks": {"1": {"origin": True}}, "origin_ranks": [1]}))


def test_heatmap_shows_the_valid_region_a_padding_band_and_positives_on_padding():
    from nanscope.report.figures import PAD_BAND
    from nanscope.report.heatmap import select_columns, select_queries

    valid = torch.zeros(256, dtype=torch.bool)
    valid[:6] = True
    cols = select_columns(valid, [1, 2, 40])
    assert cols == [*range(6 + PAD_BAND), None, 39, 40, 41, None, 255]
    long_valid = torch.ones(256, dtype=torch.bool)
    cols = select_columns(long_valid, [130])
    assert cols[:24] == list(range(24)) and 130 in cols and cols[-1] == 255 and len(cols) < 80
    logits = torch.full((900, 256), float("-inf"))
    logits[:, :6] = torch.arange(900.0)[:, None] / 900
    logits[7, 3] = float("nan")
    logits[5, 1] = 10.0  # the best query for positive token 1
    rows, tags = select_queries(logits, [1], top=3)
    assert rows == [5, 899, 898, 7] and tags == ["pos", "", "", "nan"]


def test_same_result_gives_the_same_html():
    r = Result(kind="inspect", loss_terms={"loss_ce": "nan", "loss_bbox": 0.5},
               artifacts={"image": 0, "layer": "dec0", "logits": torch.linspace(-3, 3, 64).reshape(8, 8),
                          "text_mask": torch.arange(8) < 5, "positive_map": (torch.arange(8) == 2).float()[None],
                          "tokens": list("abcde"), "num_tokens": 5, "phrases": ["c"],
                          "inf_per_layer": {"dec0": 0}, "nan_per_layer": {"dec0": 0}})
    assert render_html(r) == render_html(r)
