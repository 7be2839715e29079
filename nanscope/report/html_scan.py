"""The scan section of the HTML report (kind "scan"): the dataset line, samples affected per code with every
affected sample id, and the figures drawn from the result's fixed-bin histograms (`nanscope.scan.figures`)."""

from __future__ import annotations

from typing import Any, Mapping

from nanscope.report.html_parts import cell, e, figure, table
from nanscope.result import Result

MAX_IDS = 2000  # sample ids listed per code in the page; the JSON has them all


def _ids_cell(row: Mapping[str, Any], ids: list[Any]) -> str:
    listed = ", ".join(str(i) for i in ids[:MAX_IDS])
    if len(ids) > MAX_IDS:
        listed += f" ... (+{len(ids) - MAX_IDS}, see the JSON)"
    return f'<td><details><summary>{e(row.get("worst"))}</summary><span class="mono">{e(listed)}</span></details></td>'


def scan_section(result: Result) -> str:
    rows = result.tables.get("codes")
    hist = result.tables.get("histograms")
    if result.kind != "scan" or not isinstance(rows, list) or not isinstance(hist, Mapping):
        return ""
    from nanscope.report.terminal_scan import scan_summary_line
    from nanscope.scan import figures

    by_code = {f.code: f for f in result.findings}
    out = ['<h2 id="dataset">Dataset</h2>', f"<p>{e(scan_summary_line(result) or '')}</p>"]
    body = []
    for r in rows:
        f = by_code.get(r.get("code"))
        sev = str(r.get("severity"))
        body.append([f'<td class="mono">{e(r.get("code"))}</td>', f'<td><span class="sev {e(sev)}">{e(sev)}</span></td>',
                     f"<td>{e(r.get('title'))}</td>", cell(r.get("samples")), cell(r.get("percent")),
                     cell(r.get("count")), _ids_cell(r, list(f.data.get("samples", [])) if f is not None else [])])
    if body:
        out.append(table(["code", "severity", "title", "samples", "% of dataset", "count",
                          "worst samples (open: every affected sample id)"], body, cls="codes"))
        out.append(figure(lambda: figures.codes_png(rows), "samples affected per code",
                          "Samples affected per code; vermillion: error, orange: warning, sky blue: info."))
    mtl = int(result.summary.get("max_text_len") or 256)
    if isinstance(hist.get("tokens"), Mapping):
        out.append(figure(lambda: figures.tokens_png(hist["tokens"], mtl), "caption token lengths",
                          f"Caption length in tokens as the trainer builds it, against max_text_len={mtl} (dashed): "
                          "tokens past the line are cut by the model, and so are the positives on them (NS102/NS104)."))
    if isinstance(hist.get("boxes_per_image"), Mapping):
        out.append(figure(lambda: figures.boxes_png(hist["boxes_per_image"]), "boxes per image",
                          "Boxes per image; orange: images with no boxes (NS204)."))
    if isinstance(hist.get("box_size"), Mapping):
        out.append(figure(lambda: figures.box_sizes_png(hist["box_size"]), "box sizes",
                          "Box sizes, sqrt(width x height) in pixels, in log2 bins (a box under 1 px wide or high "
                          "is NS206)."))
    return "".join(out)
