"""Figures for the HTML report, as PNG bytes: matplotlib's Agg backend, colour-blind-safe colours.

Finite values use `cividis` (readable with every colour-vision deficiency and in greyscale); the
special cells use Okabe-Ito colours and shapes, so nothing is told by hue alone: -inf is light grey,
NaN vermillion, +inf reddish purple, positive targets are white circles, collisions (a positive
target on a padded or non-finite cell) black crosses. Every axis is labelled, every mark is in a
legend. The same data gives the same bytes (no timestamps in the PNG metadata).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

CMAP = "cividis"
NEG_INF = "#d9d9d9"  # light grey: masked/padded positions (ContrastiveEmbed writes -inf there)
NAN = "#D55E00"  # Okabe-Ito vermillion
POS_INF = "#CC79A7"  # Okabe-Ito reddish purple
GAP = "#ffffff"  # columns left out of the figure
BEFORE = "#E69F00"  # Okabe-Ito orange
AFTER = "#0072B2"  # Okabe-Ito blue
NEUTRAL = "#56B4E9"  # Okabe-Ito sky blue
DPI = 110
TOP_QUERIES = 40  # rows: the queries with the highest max logit ...
EXTRA_QUERIES = 24  # ... plus at most this many rows of positive-target, matched and NaN queries
MAX_VALID_COLUMNS = 96  # a longer valid region shows its head, its tail and windows around positives
EDGE_COLUMNS = 24  # head and tail of a long valid region
POSITIVE_WINDOW = 4  # columns either side of a positive target
PAD_BAND = 12  # padded columns shown after the text-mask boundary


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def as_number(x: Any) -> float | None:
    """A JSON number or "nan"/"inf"/"-inf" -> float; anything else -> None."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return float(x)
    return None


# ------------------------------------------------------------------ the query x token heatmap


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


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "~"


# ------------------------------------------------------------------ bar and line charts


def _wide_range(values: Iterable[float]) -> bool:
    """Positive values spanning more than two decades read better on a log axis."""
    vs = [v for v in values if math.isfinite(v)]
    return bool(vs) and min(vs) > 0 and max(vs) / min(vs) > 100


def _bars_with_nonfinite(ax: Any, names: Sequence[str], series: Sequence[tuple[str, str, Sequence[Any]]],
                         *, horizontal: bool = False, log: bool | None = None) -> bool:
    """Grouped bars; a non-finite value is a hatched bar to the end of the axis, labelled nan/inf.
    `log` None: a log axis when the finite values are positive and span more than 100x. Returns it."""
    vals = [f for _, _, s in series for f in (as_number(v) for v in s) if f is not None]
    finite = [v for v in vals if math.isfinite(v)]
    if log is None:
        log = _wide_range(finite)
    if log:
        base = min(finite) / 3
        top = max(finite) * 3
    else:
        base = 0.0
        top = (max(abs(v) for v in finite) if finite else 1.0) * 1.15 or 1.0
    n = max(len(series), 1)
    w = 0.8 / n
    bar = ax.barh if horizontal else ax.bar
    for i, (label, color, values) in enumerate(series):
        xs, hs, hatch_x, hatch_text = [], [], [], []
        for k, v in enumerate(values):
            f = as_number(v)
            x = k - 0.4 + w * (i + 0.5)
            if f is None:
                continue
            if math.isfinite(f):
                xs.append(x)
                hs.append(f - base)
            else:
                hatch_x.append(x)
                hatch_text.append("nan" if f != f else ("inf" if f > 0 else "-inf"))
        bar(xs, hs, w, base, color=color, edgecolor="black", linewidth=0.5, label=label)
        if hatch_x:
            bar(hatch_x, [top - base] * len(hatch_x), w, base, color="white", edgecolor=color, hatch="///",
                linewidth=1.0, label=f"{label}: non-finite")
            for x, t in zip(hatch_x, hatch_text):
                if horizontal:
                    ax.text(top, x, f" {t}", va="center", ha="left", fontsize=7, color="black")
                else:
                    ax.text(x, top, t, va="bottom", ha="center", fontsize=7, color="black")
    if log:
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
    ticks = range(len(names))
    if horizontal:
        ax.set_yticks(list(ticks))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
    else:
        ax.set_xticks(list(ticks))
        ax.set_xticklabels(names, fontsize=7, rotation=30 if len(names) > 4 else 0,
                           ha="right" if len(names) > 4 else "center")
    return log


def nonfinite_png(inf_per_layer: Mapping[str, int], nan_per_layer: Mapping[str, int],
                  loss_terms: Mapping[str, Any]) -> bytes:
    """Left: -inf and NaN logits per layer (all images). Right: the loss terms, non-finite ones hatched."""
    plt = _pyplot()
    panels = [p for p in (bool(inf_per_layer or nan_per_layer), bool(loss_terms)) if p]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 3.6), squeeze=False)
    i = 0
    if inf_per_layer or nan_per_layer:
        ax = axes[0][i]
        i += 1
        layers = sorted(set(inf_per_layer) | set(nan_per_layer), key=_layer_key)
        infs = [int(inf_per_layer.get(k, 0)) for k in layers]
        nans = [int(nan_per_layer.get(k, 0)) for k in layers]
        _bars_with_nonfinite(ax, layers, [("-inf logits", "#999999", infs), ("NaN logits", NAN, nans)], log=False)
        for k, (a, b) in enumerate(zip(infs, nans)):
            ax.text(k - 0.2, a, f"{a}", ha="center", va="bottom", fontsize=7)
            ax.text(k + 0.2, b, f"{b}", ha="center", va="bottom", fontsize=7)
        ax.set_xlabel("layer (dec0.. = decoder, enc = encoder proposals)", fontsize=8)
        ax.set_ylabel("non-finite logit cells (all images)", fontsize=8)
        ax.set_title("non-finite logits per layer", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
    if loss_terms:
        ax = axes[0][i]
        names = sorted(loss_terms)
        log = _bars_with_nonfinite(ax, names, [("loss term", AFTER, [loss_terms[n] for n in names])])
        ax.set_xlabel("loss term", fontsize=8)
        ax.set_ylabel(f"value{', log scale' if log else ''} (non-finite drawn hatched)", fontsize=8)
        ax.set_title("loss terms of the criterion", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _png(fig)


def _layer_key(name: str) -> tuple[int, int, str]:
    digits = "".join(c for c in name if c.isdigit())
    return (1 if name.startswith("enc") else 0, int(digits) if digits else 0, name)


def before_after_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """verify-fix: each loss term before and after the fix; non-finite values hatched."""
    plt = _pyplot()
    names = [str(r.get("term")) + (f" [{r['layer']}]" if r.get("layer") not in (None, "") else "") for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, max(2.4, 0.34 * len(rows) + 1.4)))
    log = _bars_with_nonfinite(ax, names, [("before", BEFORE, [r.get("before") for r in rows]),
                                           ("after", AFTER, [r.get("after") for r in rows])], horizontal=True)
    ax.set_xlabel(f"loss term value{', log scale' if log else ''} (non-finite drawn hatched to the axis end)",
                  fontsize=8)
    ax.set_ylabel("loss term [layer]", fontsize=8)
    ax.set_title("loss terms before and after the fix", fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.08, 1.0))
    fig.tight_layout()
    return _png(fig)


def step_series(steps: Any) -> dict[str, list[tuple[float, float]]]:
    """tables["steps"] in any of its shapes -> {series name: [(step, value), ...]}.

    Accepted: [{"step": 0, "before": 1.2, "after": 0.9}, ...]; {"before": [..], "after": [..]};
    {"before": [{"step": 0, "loss": 1.2}, ...], ...}. Values may be "nan"/"inf" strings.
    """
    out: dict[str, list[tuple[float, float]]] = {}
    if isinstance(steps, Mapping):
        for name, seq in steps.items():
            if isinstance(seq, (list, tuple)):
                pts = []
                for i, v in enumerate(seq):
                    if isinstance(v, Mapping):
                        x = as_number(v.get("step", i))
                        y = as_number(v.get("loss", v.get("total", v.get("value"))))
                    else:
                        x, y = float(i), as_number(v)
                    if x is not None and y is not None:
                        pts.append((x, y))
                if pts:
                    out[str(name)] = pts
    elif isinstance(steps, (list, tuple)):
        for i, row in enumerate(steps):
            if not isinstance(row, Mapping):
                y = as_number(row)
                if y is not None:
                    out.setdefault("loss", []).append((float(i), y))
                continue
            x = as_number(row.get("step", i))
            for k, v in row.items():
                y = as_number(v)
                if k != "step" and y is not None and x is not None:
                    out.setdefault(str(k), []).append((x, y))
    return out


def steps_png(steps: Any) -> bytes | None:
    """The loss over the optimizer steps, one line per series; non-finite steps are crosses at the top."""
    series = step_series(steps)
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    palette = [BEFORE, AFTER, "#009E73", NEUTRAL, "#F0E442", "#CC79A7", "#000000"]
    markers = ["s", "o", "^", "D", "v", "P", "*"]
    finite = [y for pts in series.values() for _, y in pts if math.isfinite(y)]
    top = (max(finite) * (2.0 if _wide_range(finite) else 1.1)) if finite else 1.0
    for i, (name, pts) in enumerate(sorted(series.items(), key=lambda kv: (kv[0] != "before", kv[0]))):
        c, m = palette[i % len(palette)], markers[i % len(markers)]
        xs = [x for x, y in pts if math.isfinite(y)]
        ys = [y for x, y in pts if math.isfinite(y)]
        if xs:
            ax.plot(xs, ys, color=c, marker=m, markersize=4, linewidth=1.2, label=name)
        bad = [x for x, y in pts if not math.isfinite(y)]
        if bad:
            ax.scatter(bad, [top] * len(bad), marker="X", color=c, edgecolors="black", s=50, zorder=3,
                       label=f"{name}: non-finite")
    log = _wide_range(finite)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.set_ylabel(f"loss{', log scale' if log else ''} (non-finite: crosses at the top)", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("loss over the optimizer steps", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _png(fig)
