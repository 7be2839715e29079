"""The terminal report: a verdict line, the findings, the checks and the worst image's lost phrases.

Rich mode repeats the verdict line last (a tall report scrolls its first line off the screen).
Findings come grouped by cause (`nanscope.causes`): each cause with its fix, then the findings it
explains, whose fix is the cause's. Two modes. Rich (a colour terminal): tables and colour, never
wider than 80 columns. Plain (output is not a terminal, NO_COLOR is set, TERM=dumb, CI logs): no
colour, no tables, one greppable line per finding - `cause 1: NS104 error count=1 where=image 2 ... |
message`, then `cause 1 fix: ...`, then the findings it explains, indented: `  NS102 error count=6 ...`
- and every check `check 3 PASS name: detail`. User text never reaches rich's markup parser.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from nanscope.causes import Group, split_notes
from nanscope.findings import Finding
from nanscope.report.terminal_scan import scan_plain_lines, scan_rich
from nanscope.result import Result

WIDTH = 80  # rich mode never draws wider than this, even in a wider terminal
STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
EXPLAINED = "\u2514"  # box-drawing corner before a finding its cause explains, in rich mode
VERDICT_STYLE = {"broken": "bold red", "clean": "bold green", "fixed": "bold green", "not fixed": "bold red"}


def verdict_line(result: Result) -> str:
    """`nanscope inspect: BROKEN - 3 error(s), 1 warning(s)` / `nanscope verify-fix: FIXED - 7/7 checks pass`."""
    if result.kind == "verify-fix":
        failed = len(result.failed_checks)
        detail = result.summary.get("verdict_detail") if result.verdict == "fixed" else None
        return (f"nanscope verify-fix: {result.verdict.upper()} - {len(result.checks) - failed}/{len(result.checks)} "
                f"checks pass" + (f" ({_one_line(detail)})" if detail else ""))
    return f"nanscope {result.kind}: {result.verdict.upper()} - {causes_text(result.groups)}"


def causes_text(groups: list[Group]) -> str:
    """`2 cause(s): 2 error(s), 0 warning(s)`: causes counted by their severity, then `, 1 note(s)` for
    info-only groups (notes, not causes); `no findings`."""
    if not groups:
        return "no findings"
    causes, notes = split_notes(groups)
    sev = [g.severity.value for g in causes]
    infos = f", {len(notes)} note(s)" if notes else ""
    return f"{len(causes)} cause(s): {sev.count('error')} error(s), {sev.count('warning')} warning(s){infos}"


def _one_line(s: Any) -> str:
    """User text (phrases, paths, messages) on one line: a CI log is read line by line."""
    return str(s).replace("\r", "\\r").replace("\n", "\\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _lost_phrases(result: Result) -> list[str]:
    """Boxes of the worst image whose positive tokens are cut or empty (NS102/NS103)."""
    art = result.artifacts
    if result.kind != "inspect" or art.get("image") is None:
        return []
    out, seen = [], set()
    for f in result.findings:
        if f.code not in ("NS102", "NS103"):
            continue
        for w in f.where:
            if w.get("image") == art["image"] and w.get("box") not in seen:
                seen.add(w.get("box"))
                toks = w.get("tokens", "")
                toks = f"{toks[0]}-{toks[-1]}" if isinstance(toks, list) and len(toks) > 1 else toks
                out.append(f"box {w.get('box')} {w.get('phrase')!r}: tokens {toks} ({w.get('why', f.code)})")
    return out


def finding_line(f: Finding) -> str:
    """`NS102 error count=6 where=image 2 box 1 'small red bird' tokens 281-283 ... | message`."""
    return f"{f.code} {f.severity.value} count={f.count} where={f.where_text()} | {f.message}"


HALF_DTYPES = ("float16", "bfloat16")


def notes_lines(result: Result) -> list[str]:
    """Facts about the run a reader could otherwise miss: half-precision weights replayed upcast."""
    dtypes = result.inputs.get("checkpoint_dtypes") or []
    half = [d for d in dtypes if d in HALF_DTYPES]
    if not half:
        return []
    amp = "bf16" if half == ["bfloat16"] else "fp16"
    note = (f"note: the checkpoint's weights are {', '.join(half)}; nanscope replayed them upcast to float32 (the "
            "model's dtype), so an overflow only half-precision weights produce may not reproduce: replay with "
            f"--amp {amp} to run the forward in half precision")
    return [note]


def user_stdout_block(result: Result) -> list[str]:
    """What the user's criterion printed, between two labelled lines (never mixed into the report)."""
    return _printed_block(result.user_stdout, "your criterion code")


def model_stdout_block(result: Result) -> list[str]:
    """What the model's own code printed during the replay (groundingdino's NaN prints), labelled the same way."""
    return _printed_block(result.model_stdout, "the model")


def _printed_block(text: str, who: str) -> list[str]:
    if not text:
        return []
    lines = text.rstrip("\n").split("\n")
    return [f"--- printed by {who} (stdout, {len(lines)} line(s)) ---", *lines, f"--- end of what {who} printed ---"]


def render_plain(result: Result) -> str:
    """The plain report as text: one fact per line, no colour, no wrapping."""
    lines = [verdict_line(result)] + scan_plain_lines(result)
    causes, notes = split_notes(result.groups)
    for n, g in enumerate(causes, 1):
        lines.append(_one_line(f"cause {n}: {finding_line(g.cause)}"))
        lines.append(_one_line(f"cause {n} fix: {g.cause.hint}"))
        lines.extend(_one_line(f"  {finding_line(f)}") for f in g.effects)
    for g in notes:
        lines.append(_one_line(f"note: {finding_line(g.cause)}"))
        lines.extend(_one_line(f"  {finding_line(f)}") for f in g.effects)
    for c in result.checks:
        lines.append(_one_line(f"check {c.id} {'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}"))
    if result.tables.get("terms"):
        lines.append("loss terms (before -> after):")
        for row in result.tables["terms"]:
            lines.append(_one_line(f"  {row.get('term')}: {_fmt(row.get('before'))} -> {_fmt(row.get('after'))}"))
    lost = _lost_phrases(result)
    if lost:
        art = result.artifacts
        lines.append(f"worst image: {art['image']} ({art.get('num_tokens')} tokens, layer {art.get('layer')})")
        lines.extend(_one_line(f"  {x}") for x in lost)
    lines.extend(notes_lines(result))
    lines.extend(model_stdout_block(result))
    lines.extend(user_stdout_block(result))
    return "\n".join(lines) + "\n"


def is_plain(console: Console) -> bool:
    """Plain when the console is not a terminal, colour is off (NO_COLOR) or the terminal is dumb."""
    return not console.is_terminal or console.no_color or console.is_dumb_terminal


def render(result: Result, console: Console, *, plain: bool | None = None) -> None:
    """Print the report on `console` (the CLI's; tests pass a Console writing to a StringIO)."""
    if plain is None:
        plain = is_plain(console)
    if plain:
        console.out(render_plain(result), end="", highlight=False)
        return
    width = min(console.width, WIDTH)

    def show(x: Any) -> None:
        console.print(x, width=width, highlight=False, markup=False)

    show(Text(verdict_line(result), style=VERDICT_STYLE.get(result.verdict, "bold")))
    for x in scan_rich(result):
        show(x)
    causes, notes = split_notes(result.groups)
    groups = causes + notes
    if groups:
        t = Table(show_lines=False, expand=False, pad_edge=False, width=None)
        t.add_column("cause", justify="right", no_wrap=True)
        t.add_column("code", no_wrap=True)
        t.add_column("sev", no_wrap=True)
        t.add_column("count", justify="right", no_wrap=True)
        t.add_column("where", overflow="fold")
        for n, g in enumerate(groups, 1):
            label = str(n) if n <= len(causes) else "note"
            for f in g.findings:
                t.add_row(label if f is g.cause else "", f.code if f is g.cause else f"{EXPLAINED} {f.code}",
                          Text(f.severity.value, style=STYLE[f.severity.value]), str(f.count),
                          Text(_one_line(f.where_text(2))))
        show(t)
        for n, g in enumerate(groups, 1):
            sev = g.severity.value
            head = f"cause {n}" if n <= len(causes) else "note"
            show(Text(f"{head}: {g.cause.code} ", style=STYLE[sev]) + Text(_one_line(g.cause.message)))
            if n <= len(causes):
                show(Text("  fix: ", style="bold") + Text(_one_line(g.cause.hint)))
            for f in g.effects:
                show(Text(f"  {EXPLAINED} {f.code} ", style=STYLE[f.severity.value]) + Text(_one_line(f.message),
                                                                                          style="dim"))
    if result.checks:
        t = Table(title="checks", pad_edge=False)
        t.add_column("#", justify="right")
        t.add_column("check", overflow="fold")
        t.add_column("result", no_wrap=True)
        t.add_column("detail", overflow="fold")
        for c in result.checks:
            t.add_row(str(c.id), Text(_one_line(c.name)),
                      Text("PASS" if c.passed else "FAIL", style="green" if c.passed else "red"),
                      Text(_one_line(c.detail)))
        show(t)
    if result.tables.get("terms"):
        t = Table(title="loss terms", pad_edge=False)
        t.add_column("term", overflow="fold")
        t.add_column("before", justify="right")
        t.add_column("after", justify="right")
        for row in result.tables["terms"]:
            t.add_row(Text(_one_line(row.get("term"))), _fmt(row.get("before")), _fmt(row.get("after")))
        show(t)
    lost = _lost_phrases(result)
    if lost:
        art = result.artifacts
        show(Text(f"worst image: {art['image']} ({art.get('num_tokens')} tokens, layer {art.get('layer')})",
                  style="bold"))
        for x in lost:
            show(Text(_one_line(f"  {x}")))
    for note in notes_lines(result):
        show(Text(note, style="yellow"))
    for block in (model_stdout_block(result), user_stdout_block(result)):
        if block:
            show(Text(block[0], style="bold"))
            console.out("\n".join(block[1:-1]), highlight=False)
            show(Text(block[-1], style="bold"))
    if result.timings:  # rich mode only: off a terminal the stage lines on stderr say it, stdout stays the same
        show(Text(timings_line(result), style="dim"))
    # the verdict again, last: a report taller than the terminal has scrolled its first line away
    show(Text(verdict_line(result), style=VERDICT_STYLE.get(result.verdict, "bold")))


def timings_line(result: Result, slowest: int = 3) -> str:
    """`time: 12.3 s in 7 stages; slowest: built the model 4.1 s, ...` (outermost stages and steps)."""
    top = [t for t in result.timings if t.depth == 0]
    worst = sorted(top, key=lambda t: -t.seconds)[:slowest]
    return (f"time: {sum(t.seconds for t in top):.1f} s in {len(top)} stage(s); slowest: "
            + ", ".join(f"{t.done} {t.seconds:.1f} s" for t in worst))
