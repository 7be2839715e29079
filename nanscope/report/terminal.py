"""The terminal report: a verdict line, the findings table, and the worst image's phrases and tokens.

Fits 80 columns. With `plain=True` (non-TTY output, NO_COLOR, CI logs) every finding is one greppable
line: `NS102 error count=6 where=image 2 box 1 ... | hint`.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from nanscope.result import Result

STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
VERDICT_STYLE = {"broken": "bold red", "clean": "bold green", "fixed": "bold green", "not fixed": "bold red"}


def verdict_line(result: Result) -> str:
    n_err = len(result.errors)
    n_warn = sum(1 for f in result.findings if f.severity.value == "warning")
    if result.kind == "verify-fix":
        failed = len(result.failed_checks)
        return (f"nanscope verify-fix: {result.verdict.upper()} - {len(result.checks) - failed}/{len(result.checks)} "
                f"checks pass")
    return f"nanscope inspect: {result.verdict.upper()} - {n_err} error(s), {n_warn} warning(s)"


def render_plain(result: Result) -> str:
    lines = [verdict_line(result)]
    for f in result.findings:
        lines.append(f"{f.code} {f.severity.value} count={f.count} where={f.where_text()} | {f.message}")
        lines.append(f"{f.code} hint: {f.hint}")
    for c in result.checks:
        lines.append(f"check {c.id} {'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}")
    if result.tables.get("terms"):
        lines.append("loss terms (before -> after):")
        for row in result.tables["terms"]:
            lines.append(f"  {row['term']}: {row['before']} -> {row['after']}")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def render(result: Result, console: Console, *, plain: bool | None = None) -> None:
    """Print the report on `console` (the CLI's; tests pass a Console writing to a StringIO)."""
    if plain is None:
        plain = not console.is_terminal or console.no_color
    if plain:
        console.out(render_plain(result), end="", highlight=False)
        return
    v = result.verdict
    console.print(Text(verdict_line(result), style=VERDICT_STYLE.get(v, "bold")))
    if result.findings:
        t = Table(show_lines=False, expand=False, pad_edge=False)
        t.add_column("code", no_wrap=True)
        t.add_column("sev", no_wrap=True)
        t.add_column("count", justify="right", no_wrap=True)
        t.add_column("where", overflow="fold")
        for f in result.findings:
            t.add_row(f.code, Text(f.severity.value, style=STYLE[f.severity.value]), str(f.count), f.where_text(2))
        console.print(t)
        for f in result.findings:
            console.print(Text(f"{f.code} ", style=STYLE[f.severity.value]) + Text(f.message))
            console.print(Text(f"  fix: {f.hint}", style="dim"))
    if result.checks:
        t = Table(title="checks", pad_edge=False)
        t.add_column("#", justify="right")
        t.add_column("check")
        t.add_column("result", no_wrap=True)
        t.add_column("detail", overflow="fold")
        for c in result.checks:
            t.add_row(str(c.id), c.name, Text("PASS" if c.passed else "FAIL", style="green" if c.passed else "red"),
                      c.detail)
        console.print(t)
    if result.tables.get("terms"):
        t = Table(title="loss terms", pad_edge=False)
        t.add_column("term")
        t.add_column("before", justify="right")
        t.add_column("after", justify="right")
        for row in result.tables["terms"]:
            t.add_row(row["term"], _fmt(row["before"]), _fmt(row["after"]))
        console.print(t)
    art = result.artifacts
    if art.get("phrases") is not None and result.kind == "inspect":
        cut = [f for f in result.findings if f.code in ("NS102", "NS103")]
        console.print(Text(f"worst image: {art['image']} ({art['num_tokens']} tokens, layer {art['layer']})",
                           style="bold"))
        for f in cut:
            for w in f.where:
                if w.get("image") == art["image"]:
                    console.print(f"  box {w.get('box')} {w.get('phrase')!r}: tokens {w.get('tokens', '')} "
                                  f"{w.get('token_text', '')!r} ({w.get('why', f.code)})")
