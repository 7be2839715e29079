"""The query x token heatmap: which rows and columns to show, and the figure (PNG bytes).

Rows are the queries worth looking at (highest max logit, positive-target, matched and NaN queries);
columns are the valid text region (its head, tail and windows around positives), the text-mask
boundary and a band of padded columns. Colours and marks follow `nanscope.report.figures`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from nanscope.report.figures import (AFTER, CMAP, EDGE_COLUMNS, EXTRA_QUERIES, MAX_VALID_COLUMNS, NAN, NEG_INF, PAD_BAND,
                                     POS_INF, POSITIVE_WINDOW, TOP_QUERIES, _png, _pyplot, _short)


@dataclass(frozen=True)
class HeatmapView:
    """Which cells of a [Q, T] logit matrix the heatmap shows, and why."""

    rows: tuple[int, ...]  # query indices, top to bottom
    row_tags: tuple[str, ...]  # "" for a top query, else "pos", "matched", "nan" (comma separated)
    columns: tuple[int | None, ...]  # token indices left to right; None is a gap of left-out columns


def select_queries(logits: torch.Tensor, positive_cols: Sequence[int], matched: Iterable[int] = (),
                   *, top: int = TOP_QUERIES, extra: int = EXTRA_QUERIES) -> tuple[list[int], list[str]]:
    """Rows for `logits` [Q, T]: the `top` queries by max finite logit (highest first), then the best
    query of each positive column, the matched queries and queries holding NaN (at most `extra`)."""
    lg = logits.float()
    finite = torch.where(torch.isfinite(lg), lg, torch.full_like(lg, -math.inf))
    best = finite.max(dim=1).values  # [Q]
    order = sorted(range(lg.shape[0]), key=lambda q: (-float(best[q]) if math.isfinite(best[q]) else math.inf, q))
    rows = order[:top]
    tags: dict[int, list[str]] = {q: [] for q in rows}
    extras: list[int] = []

    def add(q: int, tag: str) -> None:
        if q not in tags:
            if len(extras) >= extra:
                return
            tags[q] = []
            extras.append(q)
        if tag not in tags[q]:
            tags[q].append(tag)

    for j in positive_cols:
        col = finite[:, j]
        if bool(torch.isfinite(col).any()):
            add(int(col.argmax()), "pos")
    for q in matched:
        if 0 <= int(q) < lg.shape[0]:
            add(int(q), "matched")
    for q in torch.isnan(lg).any(dim=1).nonzero().flatten().tolist():
        add(int(q), "nan")
    rows = rows + extras
    return rows, [",".join(tags[q]) for q in rows]


def select_columns(valid: torch.Tensor, positive_cols: Sequence[int], *, max_valid: int = MAX_VALID_COLUMNS,
                   edge: int = EDGE_COLUMNS, window: int = POSITIVE_WINDOW, pad_band: int = PAD_BAND
                   ) -> list[int | None]:
    """Columns for a text mask `valid` [T]: the valid region (head, tail and windows around positives
    when it is longer than `max_valid`), a band of `pad_band` padded columns after the boundary, the
    positives on padding and the last column; None marks a run of left-out columns."""
    T = int(valid.shape[0])
    v = [j for j in range(T) if bool(valid[j])]
    keep: set[int] = set()
    if len(v) <= max_valid:
        keep.update(v)
    else:
        keep.update(v[:edge])
        keep.update(v[-edge:])
        for j in positive_cols:
            keep.update(range(max(0, j - window), min(T, j + window + 1)))
    last_valid = v[-1] if v else -1
    keep.update(range(last_valid + 1, min(T, last_valid + 1 + pad_band)))
    for j in positive_cols:
        if not bool(valid[j]):
            keep.update(range(max(0, j - 1), min(T, j + 2)))
    if T:
        keep.add(T - 1)
    out: list[int | None] = []
    prev = -1
    for j in sorted(keep):
        if j != prev + 1:
            out.append(None)
        out.append(j)
        prev = j
    return out


def heatmap_view(art: Mapping[str, Any]) -> HeatmapView:
    logits = art["logits"]
    T = logits.shape[1]
    valid = art.get("text_mask")
    if valid is None:
        valid = torch.ones(T, dtype=torch.bool)
    pos = _positive_columns(art)
    rows, tags = select_queries(logits, pos, art.get("matched_queries") or ())
    return HeatmapView(tuple(rows), tuple(tags), tuple(select_columns(valid.bool(), pos)))


def _positive_columns(art: Mapping[str, Any]) -> list[int]:
    pm = art.get("positive_map")
    if pm is None:
        return []
    T = art["logits"].shape[1]
    return [j for j in (pm[:, :T] > 0).any(dim=0).nonzero().flatten().tolist()]


def _token_label(j: int, tokens: Sequence[str]) -> str:
    tok = tokens[j] if j < len(tokens) else "[pad]"
    tok = tok if len(tok) <= 14 else tok[:13] + "~"
    return f"{j} {tok}"


def heatmap_png(art: Mapping[str, Any], *, truncated: Sequence[str] = ()) -> bytes:
    """The query x token heatmap of `art` (diagnose.figure_artifacts: logits [Q, T], text_mask [T],
    positive_map [N, T], tokens, phrases, layer, image). `truncated`: notes on positives lost past
    max_text_len, drawn under the x axis."""
    plt = _pyplot()
    import matplotlib.colors as mcolors
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    view = heatmap_view(art)
    logits = art["logits"].float()
    T = logits.shape[1]
    valid = art.get("text_mask")
    valid = torch.ones(T, dtype=torch.bool) if valid is None else valid.bool()
    tokens = list(art.get("tokens") or [])
    phrases = list(art.get("phrases") or [])
    pm = art.get("positive_map")
    pm = torch.zeros(0, T) if pm is None else (pm[:, :T] > 0)
    R, C = len(view.rows), len(view.columns)

    sub = logits[list(view.rows)]  # [R, T]
    shown_cols = [j for j in view.columns if j is not None]
    shown = sub[:, shown_cols]
    finite_vals = shown[torch.isfinite(shown)]
    if finite_vals.numel():
        lo = float(torch.quantile(finite_vals, 0.01)) if finite_vals.numel() > 1 else float(finite_vals[0]) - 1
        hi = float(torch.quantile(finite_vals, 0.99)) if finite_vals.numel() > 1 else float(finite_vals[0]) + 1
        if hi <= lo:
            hi = lo + 1.0
    else:
        lo, hi = 0.0, 1.0
    norm = mcolors.Normalize(vmin=lo, vmax=hi, clip=True)
    cmap = plt.get_cmap(CMAP)
    rgb = torch.ones(R, C, 3)
    special = {"-inf": torch.tensor(mcolors.to_rgb(NEG_INF)), "nan": torch.tensor(mcolors.to_rgb(NAN)),
               "+inf": torch.tensor(mcolors.to_rgb(POS_INF))}
    for k, j in enumerate(view.columns):
        if j is None:
            continue
        col = sub[:, j]
        fin = torch.isfinite(col)
        vals = torch.tensor(cmap(norm(col.clamp(lo, hi).nan_to_num(lo).numpy()))[:, :3], dtype=torch.float32)
        rgb[:, k] = torch.where(fin[:, None], vals, rgb[:, k])
        rgb[torch.isneginf(col), k] = special["-inf"]
        rgb[torch.isnan(col), k] = special["nan"]
        rgb[torch.isposinf(col), k] = special["+inf"]

    n_box = int(pm.shape[0])
    width = max(7.0, 0.17 * C + 3.0)
    height = max(4.0, 0.17 * R + 0.22 * n_box + 2.6)
    fig = plt.figure(figsize=(width, height))
    ratios = [max(n_box, 1) * 0.22, 0.17 * R]
    gs = fig.add_gridspec(2, 2, height_ratios=ratios, width_ratios=[C, max(1.2, C * 0.02)], hspace=0.04, wspace=0.02)
    ax_t = fig.add_subplot(gs[0, 0])
    ax = fig.add_subplot(gs[1, 0], sharex=ax_t)
    cax = fig.add_subplot(gs[1, 1])

    ax.imshow(rgb.numpy(), aspect="auto", interpolation="nearest")
    # the targets strip: which box has a positive target on which token
    strip = torch.ones(max(n_box, 1), C, 3)
    for k, j in enumerate(view.columns):
        if j is None:
            continue
        for b in range(n_box):
            if bool(pm[b, j]):
                strip[b, k] = torch.tensor(mcolors.to_rgb(AFTER))
            elif not bool(valid[j]):
                strip[b, k] = special["-inf"]
    ax_t.imshow(strip.numpy(), aspect="auto", interpolation="nearest")
    ax_t.set_yticks(range(max(n_box, 1)))
    ax_t.set_yticklabels([_short(f"box {b} {p!r}", 28) for b, p in enumerate(phrases[:n_box])] or ["(no boxes)"],
                         fontsize=7)
    ax_t.set_title(f"image {art.get('image')}, layer {art.get('layer')}: pred_logits [{logits.shape[0]} queries x "
                   f"{T} tokens], {R} queries x {len(shown_cols)} tokens shown", fontsize=9, loc="left")
    ax_t.tick_params(axis="x", labelbottom=False, bottom=False)

    # positives and collisions
    col_pos = {j: k for k, j in enumerate(view.columns) if j is not None}
    pos_x, pos_y, col_x, col_y, strip_x, strip_y = [], [], [], [], [], []
    for b in range(n_box):
        for j in pm[b].nonzero().flatten().tolist():
            if j not in col_pos:
                continue
            k = col_pos[j]
            bad_col = (not bool(valid[j])) or not bool(torch.isfinite(sub[:, j]).all())
            if bad_col:
                strip_x.append(k)
                strip_y.append(b)
    for r, (q, tag) in enumerate(zip(view.rows, view.row_tags)):
        if "pos" not in tag and "matched" not in tag:
            continue
        for j in (pm.any(dim=0).nonzero().flatten().tolist() if n_box else []):
            if j not in col_pos:
                continue
            v = float(logits[q, j])
            if bool(valid[j]) and math.isfinite(v):
                pos_x.append(col_pos[j])
                pos_y.append(r)
            else:
                col_x.append(col_pos[j])
                col_y.append(r)
    ms = max(3.0, min(7.0, 300.0 / max(C, R)))
    ax.scatter(pos_x, pos_y, s=ms * ms, marker="o", facecolors="white", edgecolors="black", linewidths=0.6, zorder=3)
    ax.scatter(col_x, col_y, s=ms * ms * 1.6, marker="X", facecolors="black", edgecolors="white", linewidths=0.6,
               zorder=4)
    ax_t.scatter(strip_x, strip_y, s=ms * ms * 1.6, marker="X", facecolors="black", edgecolors="white",
                 linewidths=0.6, zorder=4)

    # the text-mask boundary: wherever validity changes between neighbouring shown columns
    prev: tuple[int, bool] | None = None
    for k, j in enumerate(view.columns):
        if j is None:
            continue
        if prev is not None and prev[1] != bool(valid[j]):
            x = (prev[0] + k) / 2
            for a in (ax, ax_t):
                a.axvline(x, color="white", linewidth=3.0, zorder=5)
                a.axvline(x, color="black", linewidth=1.4, linestyle=(0, (4, 2)), zorder=6)
        prev = (k, bool(valid[j]))

    ax.set_xticks(range(C))
    ax.set_xticklabels(["..." if j is None else _token_label(j, tokens) for j in view.columns], rotation=90,
                       fontsize=7, fontfamily="monospace")
    ax.set_yticks(range(R))
    ax.set_yticklabels([f"q{q}" + (f" ({t})" if t else "") for q, t in zip(view.rows, view.row_tags)], fontsize=7,
                       fontfamily="monospace")
    ax.set_xlabel("text token (index, token); '...' = columns left out", fontsize=8)
    ax.set_ylabel(f"query: top {min(TOP_QUERIES, logits.shape[0])} by max logit, then (pos) best query per\n"
                  "positive token, (matched), (nan)", fontsize=8)

    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    cb = fig.colorbar(sm, cax=cax)
    cb.set_label("finite logit", fontsize=8)
    cb.ax.tick_params(labelsize=7)

    counts = {"-inf": int(torch.isneginf(logits).sum()), "nan": int(torch.isnan(logits).sum()),
              "+inf": int(torch.isposinf(logits).sum())}
    handles = [
        Patch(facecolor=NEG_INF, edgecolor="black", linewidth=0.5, label=f"-inf ({counts['-inf']} in this image)"),
        Patch(facecolor=NAN, edgecolor="black", linewidth=0.5, label=f"NaN ({counts['nan']})"),
        Patch(facecolor=POS_INF, edgecolor="black", linewidth=0.5, label=f"+inf ({counts['+inf']})"),
        Patch(facecolor=AFTER, edgecolor="black", linewidth=0.5, label="positive target token (top strip)"),
        Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="black",
               label="positive target, finite logit"),
        Line2D([], [], marker="X", linestyle="", markerfacecolor="black", markeredgecolor="white", markersize=8,
               label="collision: positive on padded / non-finite cell"),
        Line2D([], [], color="black", linestyle=(0, (4, 2)), label="text-mask boundary (valid | padded)"),
    ]
    note = "\n".join(truncated)
    fig.canvas.draw()  # place the legend under the tick labels, whatever their length
    box = ax.get_tightbbox(fig.canvas.get_renderer()).transformed(fig.transFigure.inverted())
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(box.x0, box.y0 - 0.005),
               bbox_transform=fig.transFigure, fontsize=7, ncol=3 if C > 40 else 2, frameon=False,
               title=note or None, title_fontsize=7, alignment="left")
    return _png(fig)
