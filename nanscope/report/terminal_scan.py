"""The terminal lines of a `nanscope scan` result: the dataset line and, per code, the samples affected,
their share of the dataset and the worst samples (plain: one greppable line per code; rich: a table)."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from nanscope.result import Result

STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _one_line(s: Any) -> str:
    return str(s).replace("\r", "\\r").replace("\n", "\\n")


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def scan_summary_line(result: Result) -> str | None:
    """`scanned 1200 samples (odvg, od), 5400 boxes, 40 with findings; caption tokens max 301 mean 96.2, ...`."""
    s = result.summary
    if result.kind != "scan" or "samples" not in s:
        return None
    tok = s.get("tokens") or {}
    return (f"scanned {s['samples']} samples ({s.get('format')}, {s.get('mode')}), {s.get('boxes')} boxes, "
            f"{s.get('samples_with_findings', 0)} with findings; caption tokens max {tok.get('max')} mean "
            f"{tok.get('mean')}, {tok.get('over_max_text_len', 0)} over max_text_len={s.get('max_text_len')}")


def scan_rows(result: Result) -> list[dict[str, Any]]:
    rows = result.tables.get("codes") if result.kind == "scan" else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def scan_plain_lines(result: Result) -> list[str]:
    head = scan_summary_line(result)
    lines = [_one_line(head)] if head else []
    for r in scan_rows(result):
        lines.append(_one_line(f"{r.get('code')} {r.get('severity')} samples={r.get('samples')} "
                               f"({_fmt(r.get('percent'))}%) count={r.get('count')} worst={r.get('worst')}"))
    return lines


def scan_rich(result: Result) -> list[Any]:
    head = scan_summary_line(result)
    out: list[Any] = [Text(_one_line(head))] if head else []
    rows = scan_rows(result)
    if rows:
        t = Table(title="samples affected per code", pad_edge=False)
        for name, just in (("code", "left"), ("sev", "left"), ("samples", "right"), ("% of data", "right"),
                           ("count", "right"), ("worst samples", "left")):
            t.add_column(name, justify=just, overflow="fold", no_wrap=name != "worst samples")  # type: ignore[arg-type]
        for r in rows:
            sev = str(r.get("severity"))
            t.add_row(str(r.get("code")), Text(sev, style=STYLE.get(sev, "")), str(r.get("samples")),
                      _fmt(r.get("percent")), str(r.get("count")), Text(_one_line(r.get("worst", ""))))
        out.append(t)
    return out
