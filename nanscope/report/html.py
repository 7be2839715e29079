"""The HTML report: one self-contained file (inline CSS, figures as data: URIs, no script, no network).

It opens from a CI artifact as well as from disk: a Content-Security-Policy forbids every request
except the embedded images. Sections appear when the result has something for them: the verdict,
the findings, the origin trace (NS301/NS302), the query x token heatmap of the worst image, the
non-finite counts, the verify-fix checks, terms and steps, any other table, and the environment.
Every piece of user text (captions, phrases, paths, messages) goes through `html.escape`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from nanscope import progress
from nanscope.causes import explains_text, split_notes
from nanscope.findings import Finding, format_where
from nanscope.report.html_parts import (CSP, CSS, MAX_WHERE, cell, e, figure, fmt, is_nonfinite, kv_table, long_text,
                                        records_table, table)
from nanscope.report.html_scan import scan_section
from nanscope.result import SCHEMA, Result

def _title(result: Result) -> str:
    return {"inspect": "nanscope inspect", "verify-fix": "nanscope verify-fix", "watch": "nanscope watch",
            "scan": "nanscope scan"}.get(
        result.kind, f"nanscope {result.kind}")


def _verdict(result: Result) -> str:
    from nanscope.report.terminal import verdict_line

    v = result.verdict
    explain = {
        "broken": "At least one error finding: the loss is or will be non-finite. Each cause is listed with its fix "
                  "and the findings it explains; fix the first one first.",
        "clean": "No error findings.",
        "fixed": "Every required verify-fix check passes.",
        "not fixed": "At least one required verify-fix check fails.",
    }.get(v, "")
    causes = []
    cause_groups, note_groups = split_notes(result.groups)
    for n, g in enumerate(cause_groups, 1):
        sev = g.severity.value
        explains = f' <span class="hint">explains {e(explains_text(g))}</span>' if g.effects else ""
        causes.append(f'<li><span class="sev {sev}">{e(sev)}</span> <span class="mono">{e(g.cause.code)}</span> '
                      f'{e(g.cause.message)}{explains}<br><span class="fix">Fix: {e(g.cause.hint)}</span></li>')
    listed = f'<ol class="causes">{"".join(causes)}</ol>' if causes else ""
    listed += "".join(f'<p class="note">Note: <span class="mono">{e(g.cause.code)}</span> {e(g.cause.message)}</p>'
                      for g in note_groups)
    return (f'<div class="verdict {e(v.replace(" ", "-"))}" id="verdict"><span class="label">{e(v.upper())}</span> '
            f'<span class="mono">{e(verdict_line(result))}</span><br><span>{e(explain)}</span> '
            f'<span class="hint">exit code {result.exit_code}</span>{listed}</div>')


def _notes(result: Result) -> str:
    from nanscope.report.terminal import notes_lines

    return "".join(f'<p class="hint" id="notes">{e(n)}</p>' for n in notes_lines(result))


def _user_stdout(result: Result) -> str:
    out = ""
    if result.model_stdout:
        out += ('<h2 id="model-stdout">Printed by the model</h2>'
                '<p class="hint">What the model\'s own code printed during the replay.</p>'
                f'<pre class="mono">{e(result.model_stdout)}</pre>')
    if result.user_stdout:
        out += ('<h2 id="user-stdout">Printed by your criterion code</h2>'
                '<p class="hint">Its stdout, captured while nanscope ran it.</p>'
                f'<pre class="mono">{e(result.user_stdout)}</pre>')
    return out


def _where_list(f: Finding) -> str:
    items = [f"<li>{e(format_where(w))}</li>" for w in f.where[:MAX_WHERE]]
    more = len(f.where) - MAX_WHERE
    if more > 0:
        items.append(f"<li>+{more} more (see the JSON)</li>")
    return f'<ul class="where">{"".join(items)}</ul>' if items else "-"


def _findings(result: Result) -> str:
    if not result.findings:
        return '<h2 id="findings">Findings</h2><p>No findings.</p>'
    head = "".join(f"<th>{h}</th>" for h in ("cause", "code", "severity", "title", "count", "where", "what", "fix"))
    bodies = []
    causes, notes = split_notes(result.groups)
    for n, g in enumerate(causes + notes, 1):
        rows = []
        label = str(n) if n <= len(causes) else "note"
        for f in g.findings:
            sev, is_cause = f.severity.value, f is g.cause
            fix = (f'<td class="fix">{e(f.hint)}</td>' if is_cause and n <= len(causes)
                   else '<td class="hint">a note: nothing to fix</td>' if is_cause
                   else f'<td class="hint">explained by cause {n} ({e(g.cause.code)}): its fix applies</td>')
            rows.append(f'<tr class="{"cause" if is_cause else "effect"}"><td class="num">{label if is_cause else ""}</td>'
                        f'<td class="mono code">{e(f.code)}</td><td><span class="sev {sev}">{e(sev)}</span></td>'
                        f'<td>{e(f.title)}</td><td class="num">{f.count}</td><td>{_where_list(f)}</td>'
                        f"<td>{e(f.message)}</td>{fix}</tr>")
        bodies.append(f'<tbody id="cause-{n}">{"".join(rows)}</tbody>')
    return ('<h2 id="findings">Findings by cause</h2>'
            '<p class="hint">Each cause (errors first, causes before symptoms), then the findings it explains, '
            'marked &#x2514;: fixing the cause fixes them. `nanscope codes` lists every code.</p>'
            f'<table class="findings"><thead><tr>{head}</tr></thead>{"".join(bodies)}</table>')


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
            rows.append([cell(w.get("phase", o.get("phase"))), f'<td class="mono">{e(w.get("op", o.get("op", "-")))}</td>',
                         f'<td class="mono">{e(w.get("module", "-"))}</td>', cell(o.get("module_type")),
                         f'<td class="mono">{e(frame)}</td>', cell(w.get("kind", o.get("kind"))),
                         cell(o.get("shape")), cell(o.get("dtype")), cell(o.get("grad_fn")), cell(o.get("inf_from"))])
        out.append(f"<h3>{e(f.code)} {e(f.title)}</h3><p>{e(f.message)}</p>")
        out.append(table(["phase", "operation", "module path", "module type", "your code (file:line)", "kind",
                           "shape", "dtype", "backward of", "made from inf written by"], rows))
        intentional = f.data.get("intentional_inf") or []
        if intentional:
            items = "".join(f"<li class=\"mono\">{e(s)}</li>" for s in intentional)
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
    from nanscope.report.heatmap import heatmap_png

    out = ['<h2 id="heatmap">Logits the loss sees: queries x text tokens</h2>']
    for m in maps:
        notes = _truncated_notes(result, m.get("image"))
        cap = (f"Image {e(m.get('image'))}, layer {e(m.get('layer'))}: the image a person should look at first "
               "(most positives lost to padding or truncation, then most -inf cells). Grey cells are -inf "
               "(padded text positions the model masks), vermillion NaN, purple +inf; the dashed line is the "
               "text-mask boundary; white circles are positive targets with a finite logit, black crosses "
               "positive targets on a padded or non-finite cell (they make the loss NaN). Rows: the queries "
               "with the highest logits plus, marked (pos), the best query of each positive token.")
        out.append(figure(lambda m=m, notes=notes: heatmap_png(m, truncated=notes),
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
        spans.append(f'<span class="{cls}" title="token {j}">{e(t)}</span>')
    phrases = "".join(f"<li>box {b}: {e(repr(p))}</li>" for b, p in enumerate(m.get("phrases") or []))
    lost = "".join(f"<li>{e(n)}</li>" for n in notes)
    n = m.get("num_tokens", len(tokens))
    return (f'<details><summary>Caption tokens of image {e(m.get("image"))} ({e(n)} tokens, {len(tokens)} reach '
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
    out.append(figure(lambda: figures.nonfinite_png(inf, nan, terms), "non-finite counts per layer and loss term",
                       "Left: -inf and NaN cells of pred_logits per layer, over all images. Right: each loss term of "
                       "the criterion; a non-finite term is drawn hatched to the top of the axis."))
    if inf or nan:
        layers = sorted(set(inf) | set(nan))
        out.append(table(["layer", "-inf logits", "NaN logits"],
                          ([cell(k), cell(inf.get(k, 0)), cell(nan.get(k, 0))] for k in layers)))
    if terms:
        out.append(table(["loss term", "value", "finite"],
                          ([f'<td class="mono">{e(k)}</td>', cell(v), cell(not is_nonfinite(v))]
                           for k, v in sorted(terms.items()))))
    return "".join(out)


def _checks(result: Result) -> str:
    if not result.checks:
        return ""
    rows = []
    for c in result.checks:
        nums = "; ".join(f"{k}={fmt(v)}" for k, v in sorted(c.numbers.items()))
        rows.append([f'<td class="num">{c.id}</td>', f"<td>{e(c.name)}</td>",
                     f'<td class="{"pass" if c.passed else "fail"}">{"PASS" if c.passed else "FAIL"}</td>',
                     f"<td>{e(c.detail)}</td>", f'<td class="mono">{long_text(nums)}</td>'])
    n_fail = len(result.failed_checks)
    return (f'<h2 id="checks">Checks ({len(result.checks) - n_fail}/{len(result.checks)} pass)</h2>'
            + table(["#", "check", "result", "detail", "numbers"], rows, cls="checks"))


def _terms(result: Result) -> str:
    rows = result.tables.get("terms")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, Mapping) for r in rows):
        return ""
    from nanscope.report import figures

    return ('<h2 id="terms">Loss terms before and after the fix</h2>'
            + figure(lambda: figures.before_after_png(rows), "loss terms before and after",
                      "Each loss term with the criterion before (orange) and after (blue) the fix; a non-finite "
                      "value is drawn hatched to the end of the axis.")
            + records_table(rows, first=("term", "layer", "before", "after")))


def _steps(result: Result) -> str:
    steps = result.tables.get("steps")
    if not steps:
        return ""
    from nanscope.report import figures

    out = ['<h2 id="steps">Loss over the optimizer steps</h2>']
    out.append(figure(lambda: figures.steps_png(steps), "loss over optimizer steps",
                       "The training loss at each optimizer step; non-finite steps are crosses at the top."))
    if isinstance(steps, list) and all(isinstance(r, Mapping) for r in steps):
        out.append(records_table(steps, first=("step",)))
    elif isinstance(steps, Mapping):
        out.append(_generic_table(steps))
    return "".join(out)


def _generic_table(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(r, Mapping) for r in value):
        return records_table(value)
    if isinstance(value, Mapping):
        return kv_table(value)
    return f"<pre>{e(fmt(value))}</pre>"


def _other_tables(result: Result) -> str:
    known = {"terms", "steps"} | ({"codes", "histograms"} if result.kind == "scan" else set())
    extra = {k: v for k, v in result.tables.items() if k not in known and v not in (None, [], {})}
    if not extra:
        return ""
    out = []
    for name in sorted(extra):
        title = {"memory": "Memory", "grads": "Gradients"}.get(name, name.replace("_", " ").capitalize())
        out.append(f'<h2 id="table-{e(name)}">{e(title)}</h2>{_generic_table(extra[name])}')
    return "".join(out)


def _ranks(result: Result) -> str:
    ranks = result.summary.get("ranks")
    if not isinstance(ranks, Mapping) or not ranks:
        return ""
    rows = [dict(v, rank=k) for k, v in sorted(ranks.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
            if isinstance(v, Mapping)]
    origin = result.summary.get("origin_ranks")
    head = f"<p>Origin rank(s): <strong>{e(fmt(origin))}</strong></p>" if origin is not None else ""
    problems = result.summary.get("problems") or []
    probs = "".join(f"<li>{e(p)}</li>" for p in problems)
    return ('<h2 id="ranks">Ranks</h2>' + head + records_table(rows, first=("rank", "origin", "verdict"))
            + (f"<p>Problems:</p><ul>{probs}</ul>" if probs else ""))


def _context(result: Result) -> str:
    out = []
    summary = {k: v for k, v in result.summary.items() if k not in ("ranks", "problems")}
    if summary:
        out.append(f'<h2 id="summary">{"Scan" if result.kind == "scan" else "Batch"}</h2>' + kv_table(summary))
    if result.inputs:
        out.append('<h2 id="inputs">Inputs</h2>' + kv_table(result.inputs))
    if result.environment:
        out.append('<h2 id="environment">Environment</h2>' + kv_table(result.environment))
    if result.timings:
        rows = ([f'<td style="padding-left:{0.55 + 1.2 * t.depth:.2f}em">{e(t.done)}</td>', cell(round(t.seconds, 2))]
                for t in result.timings)
        out.append('<h3 id="timings">Time per stage</h3>' + table(["stage (in the order they ended)", "seconds"], rows))
    return "".join(out)


@progress.staged("rendering the HTML report", "rendered the HTML report")
def render_html(result: Result) -> str:
    """The whole report as one HTML string. Never touches the network or the disk."""
    title = f"{_title(result)}: {result.verdict}"
    body = "".join([
        f"<h1>{e(title)}</h1>",
        _verdict(result),
        _checks(result),
        scan_section(result),
        _findings(result),
        _trace(result),
        _ranks(result),
        _heatmaps(result),
        _nonfinite(result),
        _terms(result),
        _steps(result),
        _other_tables(result),
        _notes(result),
        _user_stdout(result),
        _context(result),
        f'<footer>nanscope report, schema {e(SCHEMA)}, nanscope {e(result.environment.get("nanscope", "?"))}. '
        "Self-contained: no scripts, no network.</footer>",
    ])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")
