"""`nanscope demo`, the README's first command: real model, real diagnosis, fix verified, reports written."""

from __future__ import annotations

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
    assert verdicts[1] == "nanscope verify-fix: FIXED - 9/9 checks pass"
    # The cause is ranked first; the NaN loss is reported as a symptom.
    findings = [line.split()[0] for line in lines if line[:2] == "NS" and " hint:" not in line]
    assert findings[0] == "NS102" and "NS001" in findings and "NS101" in findings
    assert sum(1 for line in lines if line.startswith("check ") and " PASS " in line) == 9
