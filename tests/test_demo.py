"""`nanscope demo`, the README's first command: real model, real diagnosis, fix verified, reports written."""

from __future__ import annotations

import re

from nanscope.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    for name in ("checkpoint.pth", "batch.pt", "config.json", "report.html", "verify-fix.html"):
        assert (out / name).is_file(), name
    lines = text.splitlines()
    verdicts = [line for line in lines if line.startswith("nanscope ")]
    assert verdicts[0].startswith("nanscope inspect: BROKEN")
    assert verdicts[1] == "nanscope verify-fix: FIXED - 10/10 checks pass"
    # The long caption is the first cause; the NaN loss is listed under the padding, as a symptom.
    causes = [m.group(1) for m in map(re.compile(r"cause \d+: (NS\d{3}) ").match, lines) if m]
    explained = [m.group(1) for m in map(re.compile(r"  (NS\d{3}) (error|warning|info) ").match, lines) if m]
    assert causes[:2] == ["NS104", "NS101"] and "NS001" in explained and "NS102" in explained
    assert sum(1 for line in lines if line.startswith("check ") and " PASS " in line) == 10
