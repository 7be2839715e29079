"""CI writers: JUnit XML, and GitHub Actions' step summary and annotations.

Findings are grouped by cause (`nanscope.causes`), so one cause is reported once. JUnit: one test
case per verify-fix check (failed when the check fails) and one per error cause (always failed: an
error finding is a failure of the run), whose text lists the findings it explains; a result with
neither gets one passing case so a test report never shows "no tests". Causes at warning or info
severity, with what they explain, are listed in the suite's <system-out>.

GitHub: `github_markdown(result)` is appended to the file named by $GITHUB_STEP_SUMMARY (when set),
and `github_annotations(result)` - one `::error title=...::message` line per error cause and failed
check, `::warning` per warning cause - are written to the console, where the runner picks them up.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from typing import Any, Mapping

from nanscope.errors import OutputError
from nanscope.causes import Group, explains_text, split_notes
from nanscope.findings import Finding, format_where
from nanscope.result import Result

# XML 1.0 forbids most control characters, even escaped: drop them from user text.
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _x(s: Any) -> str:
    return _XML_BAD.sub("", str(s))


def _finding_text(f: Finding) -> str:
    where = "\n".join(f"  {format_where(w)}" for w in f.where) or "  -"
    return f"{f.message}\nwhere:\n{where}\nfix: {f.hint}\n"


def _group_text(g: Group) -> str:
    """The cause's text, then each finding it explains: code, severity, count, locations, message."""
    out = _finding_text(g.cause)
    for f in g.effects:
        where = "; ".join(format_where(w) for w in f.where) or "-"
        out += f"explains {f.code} {f.severity.value} count={f.count} ({f.title}): {f.message}\n  where: {where}\n"
    return out


def junit_xml(result: Result) -> str:
    """The result as a JUnit XML document (one <testsuite> inside <testsuites>)."""
    suite_name = f"nanscope.{result.kind}"
    cases: list[ET.Element] = []
    for c in result.checks:
        case = ET.Element("testcase", classname=f"{suite_name}.checks", name=_x(f"check {c.id}: {c.name}"), time="0")
        if not c.passed:
            nums = "\n".join(f"{k} = {v}" for k, v in sorted(c.numbers.items()))
            if c in result.failed_required:
                fail = ET.SubElement(case, "failure", message=_x(c.detail), type="CheckFailed")
                fail.text = _x(f"{c.detail}\n{nums}".strip() + "\n")
            else:  # an equivalence check (4-7): the verdict is still FIXED, so a note, like a warning
                ET.SubElement(case, "system-out").text = _x(f"differs (not required for FIXED): {c.detail}\n{nums}")
        cases.append(case)
    groups = result.groups
    for g in groups:
        if g.severity.value != "error":
            continue
        f = g.cause
        case = ET.Element("testcase", classname=f"{suite_name}.findings", name=_x(f"{f.code} {f.title}"), time="0")
        fail = ET.SubElement(case, "failure", message=_x(f.message), type=f.code)
        fail.text = _x(_group_text(g))
        cases.append(case)
    if not cases:
        cases.append(ET.Element("testcase", classname=suite_name, name=f"{result.kind}: {result.verdict}", time="0"))
    failures = sum(1 for c in cases if c.find("failure") is not None)
    root = ET.Element("testsuites", name="nanscope", tests=str(len(cases)), failures=str(failures), errors="0")
    suite = ET.SubElement(root, "testsuite", name=suite_name, tests=str(len(cases)), failures=str(failures),
                          errors="0", skipped="0", time="0")
    props = ET.SubElement(suite, "properties")
    for k, v in [("verdict", result.verdict), ("exit_code", result.exit_code)] + sorted(
            (f"environment.{k}", v) for k, v in result.environment.items()):
        ET.SubElement(props, "property", name=_x(k), value=_x(v))
    suite.extend(cases)
    causes, notes = split_notes(groups)
    others = [g for g in causes if g.severity.value != "error"]
    if others or notes:
        out = ET.SubElement(suite, "system-out")
        out.text = _x("".join(f"{g.cause.code} {g.severity.value}: {_group_text(g)}" for g in others)
                      + "".join(f"note {g.cause.code}: {_group_text(g)}" for g in notes))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# ------------------------------------------------------------------ GitHub Actions


def _gh_data(s: Any) -> str:
    """Escape a workflow-command message (GitHub's own rules: %, CR, LF)."""
    return str(s).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_prop(s: Any) -> str:
    """Escape a workflow-command property value (also ':' and ',')."""
    return _gh_data(s).replace(":", "%3A").replace(",", "%2C")


def _annotation(level: str, title: str, message: str, where: Mapping[str, Any] | None = None) -> str:
    props = [f"title={_gh_prop(title)}"]
    if where and where.get("file"):
        props.insert(0, f"file={_gh_prop(where['file'])}")
        if where.get("line") is not None:
            props.insert(1, f"line={_gh_prop(where['line'])}")
    return f"::{level} {','.join(props)}::{_gh_data(message)}"


def github_annotations(result: Result) -> list[str]:
    """One `::error` line per error cause and failed check, `::warning` per warning cause. An annotation
    points at the first `file:line` any finding of its group names (the trace's user frame)."""
    lines = []
    for g in result.groups:
        f = g.cause
        level = {"error": "error", "warning": "warning"}.get(g.severity.value)
        if level is None:
            continue
        loc = f.where_text(2)
        msg = (f"{f.message}" + (f" Where: {loc}." if loc else "")
               + (f" Explains: {explains_text(g)}." if g.effects else "") + f" Fix: {f.hint}")
        framed = next((w for x in g.findings for w in x.where if w.get("file")), f.where[0] if f.where else None)
        lines.append(_annotation(level, f"{f.code} {f.title}", msg, framed))
    for c in result.failed_checks:
        level = "error" if c in result.failed_required else "warning"  # 4-7 do not decide the verdict
        lines.append(_annotation(level, f"nanscope verify-fix check {c.id} failed: {c.name}", c.detail))
    return lines


def _md(s: Any) -> str:
    """Text for a Markdown table cell: one line, pipes and HTML escaped."""
    text = _XML_BAD.sub("", str(s)).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def github_markdown(result: Result) -> str:
    """The step summary: verdict, findings, checks, loss terms."""
    from nanscope.report.terminal import verdict_line

    ok = result.exit_code == 0
    lines = [f"## {'✅' if ok else '❌'} {_md(verdict_line(result))}", ""]
    if result.findings:
        lines += ["| cause | code | severity | count | where | what | fix |", "|---:|---|---|---:|---|---|---|"]
        causes, notes = split_notes(result.groups)
        for n, g in enumerate(causes, 1):
            for f in g.findings:
                first = f is g.cause
                lines.append(f"| {n if first else ''} | {f.code if first else '└ ' + f.code} | {f.severity.value} "
                             f"| {f.count} | {_md(f.where_text(3))} | {_md(f.message)} "
                             f"| {_md(f.hint) if first else f'see cause {n}'} |")
        for g in notes:  # info: a note about the run, with nothing to fix
            for f in g.findings:
                lines.append(f"| note | {f.code} | {f.severity.value} | {f.count} | {_md(f.where_text(3))} "
                             f"| {_md(f.message)} | - |")
        lines.append("")
    if result.checks:
        lines += ["| # | check | result | detail |", "|---:|---|---|---|"]
        for c in result.checks:
            lines.append(f"| {c.id} | {_md(c.name)} | {'PASS' if c.passed else '**FAIL**'} | {_md(c.detail)} |")
        lines.append("")
    rows = result.tables.get("terms")
    if isinstance(rows, list) and rows:
        lines += ["| loss term | before | after |", "|---|---:|---:|"]
        for r in rows:
            if isinstance(r, Mapping):
                lines.append(f"| {_md(r.get('term'))} | {_md(r.get('before'))} | {_md(r.get('after'))} |")
        lines.append("")
    elif result.loss_terms:
        lines += ["| loss term | value |", "|---|---:|"]
        lines += [f"| {_md(k)} | {_md(v)} |" for k, v in sorted(result.loss_terms.items())]
        lines.append("")
    if not result.findings and not result.checks:
        lines += ["No findings.", ""]
    return "\n".join(lines) + "\n"


def github_outputs(result: Result, console: Any, *, environ: Mapping[str, str] | None = None) -> None:
    """Append the Markdown summary to $GITHUB_STEP_SUMMARY (when set) and write the annotations to `console`."""
    env = os.environ if environ is None else environ
    path = env.get("GITHUB_STEP_SUMMARY")
    if path:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(github_markdown(result))
        except OSError as exc:
            raise OutputError(f"$GITHUB_STEP_SUMMARY {path!r} cannot be appended to: {exc.strerror or exc}") from None
    for line in github_annotations(result):
        console.out(line, highlight=False)
