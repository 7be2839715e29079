"""Building blocks of the HTML report: the stylesheet, escaping, number formatting, tables, images.

Every piece of user text goes through `e` (html.escape); numbers through `fmt`, which writes NaN and
infinities as words. Nothing here knows about results: `nanscope.report.html` assembles the sections.
"""

from __future__ import annotations

import base64
import json
import math
from html import escape
from typing import Any, Callable, Iterable, Mapping, Sequence


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
MAX_WHERE = 8  # locations listed per finding; the count says how many there are in all

CSS = """
:root { --fg: #1b1b1b; --muted: #5b5b5b; --line: #d0d0d0; --bad: #b33c00; --bad-bg: #fbe3d6;
        --good: #00704f; --good-bg: #d9f2e8; --warn: #7a5a00; --warn-bg: #fdf0c8; --info-bg: #dcecf7; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       margin: 0 auto; padding: 1.2em 1.5em 3em; max-width: 1400px; }
h1 { font-size: 1.4em; margin: 0 0 .4em; } h2 { font-size: 1.15em; margin: 1.8em 0 .5em; border-bottom: 1px solid var(--line); }
h3 { font-size: 1em; margin: 1.2em 0 .4em; }
code, pre, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: .92em; }
pre { white-space: pre-wrap; word-break: break-word; }
.verdict { border: 2px solid; border-radius: 6px; padding: .7em 1em; margin: .6em 0 1em; }
.verdict .label { font-size: 1.5em; font-weight: 700; letter-spacing: .04em; }
.verdict.broken, .verdict.not-fixed { border-color: var(--bad); background: var(--bad-bg); }
.verdict.clean, .verdict.fixed { border-color: var(--good); background: var(--good-bg); }
table { border-collapse: collapse; margin: .4em 0 1em; max-width: 100%; }
td { overflow-wrap: anywhere; } /* long paths and module names wrap: no table wider than the window */
th, td { border: 1px solid var(--line); padding: .3em .55em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.sev { font-weight: 700; padding: 0 .35em; border-radius: 3px; }
.sev.error { color: var(--bad); background: var(--bad-bg); } .sev.warning { color: var(--warn); background: var(--warn-bg); }
.sev.info { background: var(--info-bg); }
.pass { color: var(--good); font-weight: 700; } .fail { color: var(--bad); font-weight: 700; }
.nonfinite { color: var(--bad); font-weight: 700; }
.where { margin: 0; padding-left: 1.1em; } .hint { color: var(--muted); }
table.findings tbody { border-top: 2px solid var(--fg); } td.code { white-space: nowrap; }
tr.cause td.code, tr.cause td.fix { font-weight: 700; }
tr.effect td.code::before { content: "\\2514 "; color: var(--muted); }
ol.causes { margin: .5em 0 0; padding-left: 1.4em; } ol.causes li { margin: .3em 0; } .fix { font-weight: 600; }
figure { margin: .5em 0 1.2em; } figcaption { color: var(--muted); max-width: 70em; }
.scroll { overflow-x: auto; border: 1px solid var(--line); padding: 4px; }
.scroll img { display: block; max-width: none; }
img.chart { max-width: 100%; height: auto; }
.tok { display: inline-block; margin: 1px; padding: 0 3px; border: 1px solid var(--line); border-radius: 3px; }
.tok.pos { background: #cfe3f3; border-color: #0072B2; } .tok.cut { background: var(--bad-bg); border-color: var(--bad); }
footer { margin-top: 3em; color: var(--muted); font-size: .9em; }
"""


# ------------------------------------------------------------------ small helpers


def e(x: Any) -> str:
    return escape(str(x), quote=True)


def fmt(v: Any) -> str:
    """A value as short text: floats to 6 significant digits, non-finite as nan/inf, containers compact."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "-"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:.6g}")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def is_nonfinite(v: Any) -> bool:
    return v in ("nan", "inf", "-inf") or (isinstance(v, float) and not math.isfinite(v))


def cell(v: Any, *, numeric: bool | None = None) -> str:
    text = e(fmt(v))
    if is_nonfinite(v):
        return f'<td class="num nonfinite">{text}</td>'
    if numeric is None:
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
    return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, caption: str = "", cls: str = "") -> str:
    """`rows` hold ready-made <td> strings; headers are escaped here."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    cap = f"<caption>{e(caption)}</caption>" if caption else ""
    return f'<table class="{e(cls)}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def kv_table(d: Mapping[str, Any]) -> str:
    return table(["field", "value"], ([f"<th>{e(k)}</th>", cell(v, numeric=False)] for k, v in sorted(d.items())))


def records_table(rows: Sequence[Mapping[str, Any]], first: Sequence[str] = ()) -> str:
    """A list of dicts as a table: the `first` keys, then every other key in sorted order."""
    keys = [k for k in first if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys))
    return table(keys, ([cell(r.get(k)) for k in keys] for r in rows))


def long_text(text: str, limit: int = 160) -> str:
    """Escaped text; past `limit` characters the rest folds into a <details>."""
    if len(text) <= limit:
        return e(text)
    return f"<details><summary>{e(text[:limit])} ...</summary>{e(text[limit:])}</details>"


def img(png: bytes, alt: str, *, cls: str = "chart") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{e(alt)}" src="data:image/png;base64,{data}">'


def figure(make: Callable[[], bytes | None], alt: str, caption: str, *, scroll: bool = False) -> str:
    """A figure, or a short note when it cannot be drawn (the rest of the report still renders)."""
    try:
        png = make()
    except Exception as exc:  # a figure must never cost the user the report
        return f'<p class="hint">figure "{e(alt)}" could not be drawn: {e(type(exc).__name__)}: {e(exc)}</p>'
    if not png:
        return ""
    tag = img(png, alt, cls="heatmap" if scroll else "chart")
    if scroll:
        tag = f'<div class="scroll">{tag}</div>'
    return f"<figure>{tag}<figcaption>{caption}</figcaption></figure>"
