"""verify-fix's words (issue 26 item 11): counts match the names listed, a term missing from after is
called missing (not "differs"), and an info-only finding is a note, never a cause with "fix: Nothing to fix"."""

from __future__ import annotations

import re

import pytest

from nanscope.verify.checks import floats


@pytest.fixture(scope="module")
def outputs_targets(demo_replay):
    record = demo_replay.forward()
    return record.to_outputs(), demo_replay.targets()


def _named(text: str, names: list[str]) -> list[str]:
    return [n for n in names if re.search(rf"\b{re.escape(n)}\b", text)]


def test_check_4_counts_what_it_lists_and_calls_missing_terms_missing(outputs_targets):
    from nanscope.criterion.set_criterion import SetCriterion
    from nanscope.verify.pipeline import verdict_detail
    from nanscope.verify.reference import compare_presets

    outputs, targets = outputs_targets
    ref = floats(SetCriterion("mmdet", impl="masked_select")(outputs, targets))
    keys = sorted(ref)
    assert len(keys) >= 6
    changed, dropped = keys[:4], keys[4]
    after = {k: v * 1.73917 for k, v in ref.items() if k in changed}  # no count of the batch gives this ratio
    after.update({k: v for k, v in ref.items() if k not in changed and k != dropped})
    check = compare_presets(after, outputs, targets, "mmdet")
    assert not check.passed and check.numbers["closest"] == "mmdet"
    detail = verdict_detail([check], "mmdet")
    # every number stated equals the names listed with it
    for m in re.finditer(r"(\d+) term\(s\)[^(]*\(([^)]*)\)", detail):
        assert int(m.group(1)) == len(m.group(2).split(", ")), detail
    differ = detail[detail.index("differs"):detail.index("lacks")] if "lacks" in detail else detail
    assert sorted(_named(differ, keys)) == changed, detail  # all four, and only they, "differ"
    assert "lacks 1 term(s)" in detail and dropped in detail[detail.index("lacks"):], detail


def test_info_findings_are_notes_not_causes():
    from io import StringIO

    from rich.console import Console

    from nanscope.findings import Finding, Severity
    from nanscope.report.terminal import render, render_plain
    from nanscope.result import Result

    info = Finding("NS306", Severity.INFO, 1, "every model weight was loaded. Applied unmerged.", (),
                   hint="Nothing to fix.")
    err = Finding("NS101", Severity.ERROR, 2, "padded logits reach the loss", ({"image": 0},), hint="mask them")
    result = Result(kind="inspect", findings=[info, err])
    plain = render_plain(result)
    assert "cause 2" not in plain and "Nothing to fix" not in plain, plain
    assert "cause 1: NS101" in plain
    note = [line for line in plain.splitlines() if "NS306" in line]
    assert len(note) == 1 and note[0].startswith("note: NS306"), plain
    assert plain.splitlines()[0].endswith("1 cause(s): 1 error(s), 0 warning(s), 1 note(s)"), plain
    buf = StringIO()
    render(result, Console(file=buf, width=80, force_terminal=True, color_system=None), plain=False)
    rich_text = buf.getvalue()
    assert "cause 2" not in rich_text and "Nothing to fix" not in rich_text and "note: NS306" in rich_text

    from nanscope.report.html import render_html

    page = render_html(result)
    assert "Nothing to fix" not in page and 'Note: <span class="mono">NS306</span>' in page
