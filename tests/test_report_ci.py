"""CI outputs: JUnit XML (one case per check and error finding) and GitHub Actions summary + annotations."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from io import StringIO

from rich.console import Console

from _report_demo import demo_json
from nanscope.cli import main
from nanscope.findings import CATALOGUE
from nanscope.findings import Finding, Severity
from nanscope.report.ci import github_annotations, github_markdown, github_outputs, junit_xml
from nanscope.report.json_io import read_result, write_result
from nanscope.result import Check, Result


def _inspect_result() -> Result:
    return Result(kind="inspect", findings=[
        Finding("NS102", Severity.ERROR, 6, "6 positives on padding <b>&</b>\x01",
                ({"image": 2, "box": 1, "phrase": "small | red\nbird"},)),
        Finding("NS001", Severity.ERROR, 1, "loss_ce is nan: 100%\nsecond line", ({"term": "loss_ce"},)),
        Finding("NS104", Severity.WARNING, 1, "caption has 290 tokens", ({"image": 2},)),
        Finding("NS204", Severity.INFO, 1, "image 3 has no boxes"),
    ])


def _verify_result() -> Result:
    return Result(kind="verify-fix", checks=[
        Check(1, "every loss term finite", True, "6/6 finite", {"finite": 6}),
        Check(2, "gradients finite", False, "3 parameters have NaN gradients", {"nan_params": 3}),
        Check(3, "loss decreases", True, "1.2 -> 0.8"),
    ])


def _cases(xml: str) -> list[ET.Element]:
    root = ET.fromstring(xml.encode("utf-8"))
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    cases = suites[0].findall("testcase")
    assert int(suites[0].get("tests")) == len(cases) == int(root.get("tests"))
    assert int(suites[0].get("failures")) == sum(c.find("failure") is not None for c in cases)
    return cases


def test_junit_one_failed_case_per_error_finding():
    r = _inspect_result()
    cases = _cases(junit_xml(r))
    assert [c.get("name") for c in cases] == [f"{f.code} {f.title}" for f in r.errors]
    fail = cases[0].find("failure")
    assert fail.get("type") == "NS102" and fail.get("message") == "6 positives on padding <b>&</b>"  # \x01 dropped
    assert "image 2 box 1 'small | red\\nbird'" in fail.text and "fix: " in fail.text  # phrases as repr()
    out = ET.fromstring(junit_xml(r)).find("testsuite/system-out").text
    assert "NS104 warning" in out and "note NS204" in out  # an info finding is a note, not a cause


def test_junit_one_case_per_check():
    r = _verify_result()
    cases = _cases(junit_xml(r))
    assert len(cases) == len(r.checks)
    assert [c.find("failure") is not None for c in cases] == [not c.passed for c in r.checks]
    assert cases[1].find("failure").get("message") == "3 parameters have NaN gradients"
    assert "nan_params = 3" in cases[1].find("failure").text


def test_junit_of_a_clean_result_has_one_passing_case():
    cases = _cases(junit_xml(Result(kind="inspect")))
    assert len(cases) == 1 and cases[0].find("failure") is None and cases[0].get("name") == "inspect: clean"


def test_github_annotations_escape_workflow_command_syntax():
    lines = github_annotations(_inspect_result()) + github_annotations(_verify_result())
    assert all("\n" not in ln for ln in lines)
    assert lines[0].startswith("::error title=NS102 positive target on a padded or truncated token::6 positives")
    assert "small | red\\nbird" in lines[0]
    assert lines[1].startswith("::error title=NS001 non-finite loss term::loss_ce is nan: 100%25%0Asecond line")
    assert lines[2].startswith("::warning title=NS104 ")
    assert not any("NS204" in ln for ln in lines)  # infos are not annotated
    assert lines[3] == "::error title=nanscope verify-fix check 2 failed%3A gradients finite::3 parameters have NaN gradients"


def test_github_annotation_points_at_the_users_frame():
    f = Finding("NS301", Severity.ERROR, 1, "NaN first appears in the forward at div",
                ({"phase": "forward", "module": "(loss code)", "op": "div", "file": "train.py", "line": 42},))
    (line,) = github_annotations(Result(kind="inspect", findings=[f]))
    assert line.startswith("::error file=train.py,line=42,title=NS301 first non-finite value in the forward::")


def test_github_outputs_append_summary_and_print_annotations(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    buf = StringIO()
    github_outputs(_verify_result(), Console(file=buf, width=80), environ={"GITHUB_STEP_SUMMARY": str(summary)})
    text = summary.read_text()
    assert text.startswith("earlier step\n## ❌ nanscope verify-fix: NOT FIXED - 2/3 checks pass")
    assert "| 2 | gradients finite | **FAIL** | 3 parameters have NaN gradients |" in text
    printed = buf.getvalue().splitlines()
    assert printed == github_annotations(_verify_result())  # long lines are never wrapped


def test_github_markdown_escapes_table_cells():
    md = github_markdown(_inspect_result())
    row = next(ln for ln in md.splitlines() if ln.startswith("| 1 | NS102 "))
    assert "'small \\| red\\nbird'" in row and "padding &lt;b&gt;&amp;&lt;/b&gt; |" in row
    assert row.count(" | ") == 6  # seven cells, no stray separators


def test_cli_report_writes_junit_and_github(tmp_path, monkeypatch, capsys):
    src = tmp_path / "r.json"
    write_result(_verify_result(), src)
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    junit = tmp_path / "junit.xml"
    assert main(["report", str(src), "--junit", str(junit), "--github"]) == 1
    assert len(_cases(junit.read_text())) == 3
    out = capsys.readouterr().out
    assert "::error title=nanscope verify-fix check 2 failed%3A gradients finite::" in out
    assert "check 2 FAIL gradients finite: 3 parameters have NaN gradients" in out
    assert "NOT FIXED" in summary.read_text()


def test_ci_outputs_report_each_cause_once_with_what_it_explains(demo_files, tmp_path_factory):
    """The demo: two causes (the 290-token caption, the unmasked padding), so two failed JUnit cases and
    two annotations; the caption's case and annotation name the three findings it explains."""
    demo = read_result(demo_json(demo_files, tmp_path_factory))
    counts = {f.code: f.count for f in demo.findings}
    cases = _cases(junit_xml(demo))
    assert [c.get("name") for c in cases] == [f"NS104 {CATALOGUE['NS104'].title}", f"NS101 {CATALOGUE['NS101'].title}"]
    text = cases[0].find("failure").text
    for code in ("NS102", "NS103", "NS203"):
        assert f"explains {code} " in text and f"count={counts[code]} " in text
    assert text.count("fix: ") == 1 and CATALOGUE["NS102"].hint not in text
    assert "explains NS001 error count=2 " in cases[1].find("failure").text
    lines = github_annotations(demo)
    assert [ln.split("::")[1] for ln in lines] == [f"error title=NS104 {CATALOGUE['NS104'].title}",
                                                   f"error title=NS101 {CATALOGUE['NS101'].title}"]
    assert f"Explains: NS102 x{counts['NS102']}, NS103 x{counts['NS103']}, NS203 x{counts['NS203']}." in lines[0]
    md = github_markdown(demo).splitlines()
    rows = [ln.split(" | ")[:2] for ln in md if ln.startswith("| ") and " NS" in ln]
    assert rows == [["| 1", "NS104"], ["| ", "└ NS102"], ["| ", "└ NS103"], ["| ", "└ NS203"], ["| 2", "NS101"],
                    ["| ", "└ NS001"]]
    assert md[0] == "## ❌ nanscope inspect: BROKEN - 2 cause(s): 2 error(s), 0 warning(s)"


def test_info_findings_are_notes_not_causes_in_the_step_summary():
    from nanscope.findings import Finding, Severity
    from nanscope.result import Result

    err = Finding("NS103", Severity.ERROR, 1, "an empty row", ({"image": 0, "box": 1},))
    info = Finding("NS204", Severity.INFO, 1, "an image without boxes", ({"image": 1},))
    md = github_markdown(Result(kind="inspect", findings=[err, info]))
    rows = [line for line in md.splitlines() if line.startswith("| ") and "NS" in line]
    assert rows[0].startswith("| 1 | NS103 |") and rows[1].startswith("| note | NS204 |")
    assert rows[1].endswith("| - |")  # no fix for a note
