"""The HTML report: one self-contained file (inline CSS, figures as data: URIs, no script, no network).

It opens from a CI artifact as well as from disk: a Content-Security-Policy forbids every request
except the embedded images. Sections appear when the result has something for them: the verdict,
the findings, the origin trace (NS301/NS302), the query x token heatmap of the worst image, the
non-finite counts, the verify-fix checks, terms and steps, any other table, and the environment.
Every piece of user text (captions, phrases, paths, messages) goes through `html.escape`.
"""

from __future__ import annotations

import base64
import json
import math
from html import escape
from typing import Any, Callable, Iterable, Mapping, Sequence

from nanscope.findings import Finding, format_where
from nanscope.result import SCHEMA, Result

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
table { border-collapse: collapse; margin: .4em 0 1em; }
th, td { border: 1px solid var(--line); padding: .3em .55em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.sev { font-weight: 700; padding: 0 .35em; border-radius: 3px; }
.sev.error { color: var(--bad); background: var(--bad-bg); } .sev.warning { color: var(--warn); background: var(--warn-bg); }
.sev.info { background: var(--info-bg); }
.pass { color: var(--good); font-weight: 700; } .fail { color: var(--bad); font-weight: 700; }
.nonfinite { color: var(--bad); font-weight: 700; }
.where { margin: 0; padding-left: 1.1em; } .hint { color: var(--muted); }
figure { margin: .5em 0 1.2em; } figcaption { color: var(--muted); max-width: 70em; }
.scroll { overflow-x: auto; border: 1px solid var(--line); padding: 4px; }
.scroll img { display: block; max-width: none; }
img.chart { max-width: 100%; height: auto; }
.tok { display: inline-block; margin: 1px; padding: 0 3px; border: 1px solid var(--line); border-radius: 3px; }
.tok.pos { background: #cfe3f3; border-color: #0072B2; } .tok.cut { background: var(--bad-bg); border-color: var(--bad); }
footer { margin-top: 3em; color: var(--muted); font-size: .9em; }
"""


# ------------------------------------------------------------------ small helpers


def _e(x: Any) -> str:
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


def _is_nonfinite(v: Any) -> bool:
    return v in ("nan", "inf", "-inf") or (isinstance(v, float) and not math.isfinite(v))


def _cell(v: Any, *, numeric: bool | None = None) -> str:
    text = _e(fmt(v))
    if _is_nonfinite(v):
        return f'<td class="num nonfinite">{text}</td>'
    if numeric is None:
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
    return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, caption: str = "", cls: str = "") -> str:
    """`rows` hold ready-made <td> strings; headers are escaped here."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f'<table class="{_e(cls)}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv_table(d: Mapping[str, Any]) -> str:
    return _table(["field", "value"], ([f"<th>{_e(k)}</th>", _cell(v, numeric=False)] for k, v in sorted(d.items())))


def _records_table(rows: Sequence[Mapping[str, Any]], first: Sequence[str] = ()) -> str:
    """A list of dicts as a table: the `first` keys, then every other key in sorted order."""
    keys = [k for k in first if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys))
    return _table(keys, ([_cell(r.get(k)) for k in keys] for r in rows))


def _long(text: str, limit: int = 160) -> str:
    """Escaped text; past `limit` characters the rest folds into a <details>."""
    if len(text) <= limit:
        return _e(text)
    return f"<details><summary>{_e(text[:limit])} ...</summary>{_e(text[limit:])}</details>"


def _img(png: bytes, alt: str, *, cls: str = "chart") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _figure(make: Callable[[], bytes | None], alt: str, caption: str, *, scroll: bool = False) -> str:
    """A figure, or a short note when it cannot be drawn (the rest of the report still renders)."""
    try:
        png = make()
    except Exception as exc:  # a figure must never cost the user the report
        return f'<p class="hint">figure "{_e(alt)}" could not be drawn: {_e(type(exc).__name__)}: {_e(exc)}</p>'
    if not png:
        return ""
    img = _img(png, alt, cls="heatmap" if scroll else "chart")
    if scroll:
        img = f'<div class="scroll">{img}</div>'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


# ------------------------------------------------------------------ sections


def _title(result: Result) -> str:
    return {"inspect": "nanscope inspect", "verify-fix": "nanscope verify-fix", "watch": "nanscope watch"}.get(
        result.kind, f"nanscope {result.kind}")


def _verdict(result: Result) -> str:
    from nanscope.report.terminal import verdict_line

    v = result.verdict
    explain = {
        "broken": "At least one error finding: the loss is or will be non-finite. The first row is the cause to fix first.",
        "clean": "No error findings.",
        "fixed": "Every verify-fix check passes.",
        "not fixed": "At least one verify-fix check fails.",
    }.get(v, "")
    return (f'<div class="verdict {_e(v.replace(" ", "-"))}" id="verdict"><span class="label">{_e(v.upper())}</span> '
            f'<span class="mono">{_e(verdict_line(result))}</span><br><span>{_e(explain)}</span> '
            f'<span class="hint">exit code {result.exit_code}</span></div>')


def _where_list(f: Finding) -> str:
    items = [f"<li>{_e(format_where(w))}</li>" for w in f.where[:MAX_WHERE]]
    more = len(f.where) - MAX_WHERE
    if more > 0:
        items.append(f"<li>+{more} more (see the JSON)</li>")
    return f'<ul class="where">{"".join(items)}</ul>' if items else "-"


def _findings(result: Result) -> str:
    if not result.findings:
        return '<h2 id="findings">Findings</h2><p>No findings.</p>'
    rows = []
    for f in result.findings:
        sev = f.severity.value
        rows.append([f'<td class="mono code">{_e(f.code)}</td>', f'<td><span class="sev {sev}">{_e(sev)}</span></td>',
                     f"<td>{_e(f.title)}</td>", f'<td class="num">{f.count}</td>', f"<td>{_where_list(f)}</td>",
                     f"<td>{_e(f.message)}</td>", f'<td class="hint">{_e(f.hint)}</td>'])
    return ('<h2 id="findings">Findings</h2>'
            '<p class="hint">Errors first, causes before symptoms. `nanscope codes` lists every code.</p>'
            + _table(["code", "severity", "title", "count", "where", "what", "fix"], rows, cls="findings"))


def _trace(result: Result) -> str:
    traced = [f for f in result.findings if f.code in ("NS301", "NS302")]
    if not traced:
        return ""
    out = ['<h2 id="trace">Where the first non-finite value appears</h2>']
    for f in traced:
        origins = list(f.data.get("origins") or [])
        rows = []
        for i, w in enumerate(f.where):
            o = origins[i] if i < len(origins) and isinstance(origins[i], Mapping) else {}
            frame = f"{w.get('file')}:{w.get('line')}" if w.get("file") else "-"
            if o.get("function"):
                frame += f" in {o['function']}"
            rows.append([_cell(w.get("phase", o.get("phase"))), f'<td class="mono">{_e(w.get("op", o.get("op", "-")))}</td>',
                         f'<td class="mono">{_e(w.get("module", "-"))}</td>', _cell(o.get("module_type")),
                         f'<td class="mono">{_e(frame)}</td>', _cell(w.get("kind", o.get("kind"))),
                         _cell(o.get("shape")), _cell(o.get("dtype")), _cell(o.get("grad_fn")), _cell(o.get("inf_from"))])
        out.append(f"<h3>{_e(f.code)} {_e(f.title)}</h3><p>{_e(f.message)}</p>")
        out.append(_table(["phase", "operation", "module path", "module type", "your code (file:line)", "kind",
                           "shape", "dtype", "backward of", "made from inf written by"], rows))
        intentional = f.data.get("intentional_inf") or []
        if intentional:
            items = "".join(f"<li class=\"mono\">{_e(s)}</li>" for s in intentional)
            out.append(f'<p>Infinities written on purpose (masking, not origins):</p><ul>{items}</ul>')
    return "".join(out)


def _truncated_notes(result: Result, image: Any) -> list[str]:
    """One note per box of the heatmap's image whose positive tokens are cut or empty (NS102/NS103)."""
    boxes: dict[Any, tuple[Mapping[str, Any], list[str]]] = {}
    for f in result.findings:
        if f.code not in ("NS102", "NS103"):
            continue
        for w in f.where:
            if w.get("image") == image:
                boxes.setdefault(w.get("box"), (w, []))[1].append(f.code)
    notes = []
    for w, codes in boxes.values():
        toks = w.get("tokens", w.get("token"))
        toks_text = f" {format_where({'tokens': toks})}" if toks is not None else ""
        why = w.get("why", "")
        why = why if len(str(why)) <= 40 else "no positive token in the logits"
        notes.append(f"box {w.get('box')} {w.get('phrase')!r}{toks_text}: {why} ({', '.join(codes)})")
    return notes


def _heatmaps(result: Result) -> str:
    art = result.artifacts or {}
    maps = [m for m in (art.get("heatmaps") or [art]) if isinstance(m, Mapping) and m.get("logits") is not None]
    if not maps:
        return ""
    from nanscope.report import figures

    out = ['<h2 id="heatmap">Logits the loss sees: queries x text tokens</h2>']
    for m in maps:
        notes = _truncated_notes(result, m.get("image"))
        cap = (f"Image {_e(m.get('image'))}, layer {_e(m.get('layer'))}: the image a person should look at first "
               "(most positives lost to padding or truncation, then most -inf cells). Grey cells are -inf "
               "(padded text positions the model masks), vermillion NaN, purple +inf; the dashed line is the "
               "text-mask boundary; white circles are positive targets with a finite logit, black crosses "
               "positive targets on a padded or non-finite cell (they make the loss NaN). Rows: the queries "
               "with the highest logits plus, marked (pos), the best query of each positive token.")
        out.append(_figure(lambda m=m, notes=notes: figures.heatmap_png(m, truncated=notes),
                           f"query x token heatmap, image {m.get('image')}", cap, scroll=True))
        out.append(_tokens_block(m, notes))
    return "".join(out)


def _tokens_block(m: Mapping[str, Any], notes: Sequence[str]) -> str:
    tokens = list(m.get("tokens") or [])
    if not tokens:
        return ""
    pm = m.get("positive_map")
    pos = set()
    if pm is not None:
        pos = set((pm > 0).any(dim=0).nonzero().flatten().tolist())
    mask = m.get("text_mask")
    spans = []
    for j, t in enumerate(tokens):
        cls = "tok" + (" pos" if j in pos else "") + (" cut" if mask is not None and j < len(mask) and not bool(mask[j]) else "")
        spans.append(f'<span class="{cls}" title="token {j}">{_e(t)}</span>')
    phrases = "".join(f"<li>box {b}: {_e(repr(p))}</li>" for b, p in enumerate(m.get("phrases") or []))
    lost = "".join(f"<li>{_e(n)}</li>" for n in notes)
    n = m.get("num_tokens", len(tokens))
    return (f'<details><summary>Caption tokens of image {_e(m.get("image"))} ({_e(n)} tokens, {len(tokens)} reach '
            f'the model; blue: positive targets)</summary><p>{"".join(spans)}</p>'
            f'<p>Target phrases:</p><ul>{phrases}</ul>'
            + (f'<p>Positives lost past max_text_len:</p><ul>{lost}</ul>' if lost else "") + "</details>")


def _nonfinite_counts(result: Result) -> tuple[dict[str, int], dict[str, int]]:
    art = result.artifacts or {}
    inf, nan = dict(art.get("inf_per_layer") or {}), dict(art.get("nan_per_layer") or {})
    if inf or nan:
        return inf, nan
    for f in result.findings:  # no sidecar: NS101 carries the -inf cells per layer and image
        per_layer = f.data.get("per_layer") if f.code == "NS101" else None
        if isinstance(per_layer, Mapping):
            for layer, per_image in per_layer.items():
                if isinstance(per_image, list):
                    inf[layer] = sum(int(x.get("inf_cells", 0)) for x in per_image if isinstance(x, Mapping))
    return inf, nan


def _nonfinite(result: Result) -> str:
    inf, nan = _nonfinite_counts(result)
    terms = result.loss_terms
    if not (inf or nan or terms):
        return ""
    from nanscope.report import figures

    out = ['<h2 id="nonfinite">Non-finite values per layer and per loss term</h2>']
    out.append(_figure(lambda: figures.nonfinite_png(inf, nan, terms), "non-finite counts per layer and loss term",
                       "Left: -inf and NaN cells of pred_logits per layer, over all images. Right: each loss term of "
                       "the criterion; a non-finite term is drawn hatched to the top of the axis."))
    if inf or nan:
        layers = sorted(set(inf) | set(nan))
        out.append(_table(["layer", "-inf logits", "NaN logits"],
                          ([_cell(k), _cell(inf.get(k, 0)), _cell(nan.get(k, 0))] for k in layers)))
    if terms:
        out.append(_table(["loss term", "value", "finite"],
                          ([f'<td class="mono">{_e(k)}</td>', _cell(v), _cell(not _is_nonfinite(v))]
                           for k, v in sorted(terms.items()))))
    return "".join(out)


def _checks(result: Result) -> str:
    if not result.checks:
        return ""
    rows = []
    for c in result.checks:
        nums = "; ".join(f"{k}={fmt(v)}" for k, v in sorted(c.numbers.items()))
        rows.append([f'<td class="num">{c.id}</td>', f"<td>{_e(c.name)}</td>",
                     f'<td class="{"pass" if c.passed else "fail"}">{"PASS" if c.passed else "FAIL"}</td>',
                     f"<td>{_e(c.detail)}</td>", f'<td class="mono">{_long(nums)}</td>'])
    n_fail = len(result.failed_checks)
    return (f'<h2 id="checks">Checks ({len(result.checks) - n_fail}/{len(result.checks)} pass)</h2>'
            + _table(["#", "check", "result", "detail", "numbers"], rows, cls="checks"))


def _terms(result: Result) -> str:
    rows = result.tables.get("terms")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, Mapping) for r in rows):
        return ""
    from nanscope.report import figures

    return ('<h2 id="terms">Loss terms before and after the fix</h2>'
            + _figure(lambda: figures.before_after_png(rows), "loss terms before and after",
                      "Each loss term with the criterion before (orange) and after (blue) the fix; a non-finite "
                      "value is drawn hatched to the end of the axis.")
            + _records_table(rows, first=("term", "layer", "before", "after")))


def _steps(result: Result) -> str:
    steps = result.tables.get("steps")
    if not steps:
        return ""
    from nanscope.report import figures

    out = ['<h2 id="steps">Loss over the optimizer steps</h2>']
    out.append(_figure(lambda: figures.steps_png(steps), "loss over optimizer steps",
                       "The training loss at each optimizer step; non-finite steps are crosses at the top."))
    if isinstance(steps, list) and all(isinstance(r, Mapping) for r in steps):
        out.append(_records_table(steps, first=("step",)))
    elif isinstance(steps, Mapping):
        out.append(_generic_table(steps))
    return "".join(out)


def _generic_table(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(r, Mapping) for r in value):
        return _records_table(value)
    if isinstance(value, Mapping):
        return _kv_table(value)
    return f"<pre>{_e(fmt(value))}</pre>"


def _other_tables(result: Result) -> str:
    known = {"terms", "steps"}
    extra = {k: v for k, v in result.tables.items() if k not in known and v not in (None, [], {})}
    if not extra:
        return ""
    out = []
    for name in sorted(extra):
        title = {"memory": "Memory", "grads": "Gradients"}.get(name, name.replace("_", " ").capitalize())
        out.append(f'<h2 id="table-{_e(name)}">{_e(title)}</h2>{_generic_table(extra[name])}')
    return "".join(out)


def _ranks(result: Result) -> str:
    ranks = result.summary.get("ranks")
    if not isinstance(ranks, Mapping) or not ranks:
        return ""
    rows = [dict(v, rank=k) for k, v in sorted(ranks.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
            if isinstance(v, Mapping)]
    origin = result.summary.get("origin_ranks")
    head = f"<p>Origin rank(s): <strong>{_e(fmt(origin))}</strong></p>" if origin is not None else ""
    problems = result.summary.get("problems") or []
    probs = "".join(f"<li>{_e(p)}</li>" for p in problems)
    return ('<h2 id="ranks">Ranks</h2>' + head + _records_table(rows, first=("rank", "origin", "verdict"))
            + (f"<p>Problems:</p><ul>{probs}</ul>" if probs else ""))


def _context(result: Result) -> str:
    out = []
    summary = {k: v for k, v in result.summary.items() if k not in ("ranks", "problems")}
    if summary:
        out.append('<h2 id="summary">Batch</h2>' + _kv_table(summary))
    if result.inputs:
        out.append('<h2 id="inputs">Inputs</h2>' + _kv_table(result.inputs))
    if result.environment:
        out.append('<h2 id="environment">Environment</h2>' + _kv_table(result.environment))
    return "".join(out)


def render_html(result: Result) -> str:
    """The whole report as one HTML string. Never touches the network or the disk."""
    title = f"{_title(result)}: {result.verdict}"
    body = "".join([
        f"<h1>{_e(title)}</h1>",
        _verdict(result),
        _checks(result),
        _findings(result),
        _trace(result),
        _ranks(result),
        _heatmaps(result),
        _nonfinite(result),
        _terms(result),
        _steps(result),
        _other_tables(result),
        _context(result),
        f'<footer>nanscope report, schema {_e(SCHEMA)}, nanscope {_e(result.environment.get("nanscope", "?"))}. '
        "Self-contained: no scripts, no network.</footer>",
    ])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")
