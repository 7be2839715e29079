"""The scan report's figures, as PNG bytes (matplotlib Agg; the conventions of `nanscope.report.figures`:
colour-blind-safe colours, every axis labelled, every mark in a legend, the same data gives the same bytes).

All read the result's `tables["histograms"]` (fixed bins, so a merged shard report draws the same figures).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from nanscope.report.figures import AFTER, BEFORE, NAN, NEUTRAL, _png, _pyplot

SEVERITY_COLOR = {"error": NAN, "warning": BEFORE, "info": NEUTRAL}


def _mpl() -> tuple[Any, Any]:
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    return Patch, MaxNLocator


def _legend_outside(ax: Any, **kw: Any) -> None:
    """The legend right of the axes: inside, some counts always put a bar under it."""
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kw)


def _trim(counts: Sequence[int]) -> int:
    """Index past the last non-empty bin (at least 1)."""
    last = max((k for k, c in enumerate(counts) if c), default=0)
    return last + 1


def tokens_png(hist: Mapping[str, Any], max_text_len: int) -> bytes:
    return _png(tokens_figure(hist, max_text_len))


def tokens_figure(hist: Mapping[str, Any], max_text_len: int) -> Any:
    """Caption length histogram with the max_text_len line; bars past it in vermillion."""
    plt = _pyplot()
    Patch, MaxNLocator = _mpl()
    counts = list(hist.get("counts") or [])
    width = int(hist.get("bin") or 8)
    n = max(_trim(counts), max_text_len // width + 2)
    n = min(n, len(counts))
    xs = [k * width for k in range(n)]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    fits = [c if x + width <= max_text_len else 0 for x, c in zip(xs, counts)]
    over = [c if x + width > max_text_len else 0 for x, c in zip(xs, counts)]
    ax.bar(xs, fits, width, align="edge", color=AFTER, edgecolor="black", linewidth=0.3, label="captions that fit")
    ax.bar(xs, over, width, align="edge", color=NAN, edgecolor="black", linewidth=0.3, hatch="//",
           label="bins reaching past max_text_len")
    ax.axvline(max_text_len, color="black", linestyle="--", linewidth=1.2, label=f"max_text_len = {max_text_len}")
    log = any(counts) and max(counts) / max(min(c for c in counts if c), 1) > 100
    if log:
        ax.set_yscale("log")
    last = n * width
    ax.set_xlabel(f"caption tokens with [CLS]/[SEP] (bins of {width}{'; the last bin holds all longer' if n == len(counts) else ''})",
                  fontsize=8)
    ax.set_ylabel("samples", fontsize=8)
    if not log:  # a log axis keeps its own locator
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, max(last, max_text_len + width))
    ax.set_title("caption length as the trainer builds it", fontsize=9)
    _legend_outside(ax)
    fig.tight_layout()
    return fig


def boxes_png(hist: Mapping[str, Any]) -> bytes:
    return _png(boxes_figure(hist))


def boxes_figure(hist: Mapping[str, Any]) -> Any:
    plt = _pyplot()
    Patch, MaxNLocator = _mpl()
    counts = list(hist.get("counts") or [])
    n = _trim(counts)
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    ax.bar(range(n), counts[:n], 1.0, color=NEUTRAL, edgecolor="black", linewidth=0.3, label="images")
    if counts and counts[0]:
        ax.bar([0], [counts[0]], 1.0, color=BEFORE, edgecolor="black", linewidth=0.3, label="no boxes (NS204)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.6, max(n, 2) - 0.4)
    ax.set_xlabel("boxes per image" + (" (the last bar: more than 100)" if n == len(counts) else ""), fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.set_title("boxes per image", fontsize=9)
    _legend_outside(ax)
    fig.tight_layout()
    return fig


def _short(n: int) -> str:
    """1, 512, 1k, 8k: a tick label a few characters wide."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def box_sizes_png(hist: Mapping[str, Any]) -> bytes:
    return _png(box_sizes_figure(hist))


def box_sizes_figure(hist: Mapping[str, Any]) -> Any:
    plt = _pyplot()
    Patch, MaxNLocator = _mpl()
    counts = list(hist.get("counts") or [])
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    ax.bar(range(len(counts)), counts, 0.9, color=AFTER, edgecolor="black", linewidth=0.3, label="boxes")
    # bin k holds [2^(k-1), 2^k) (bin 0: < 1, the last: all larger): one short, level label per bin edge
    edges = range(1, len(counts))
    ax.set_xticks([k - 0.5 for k in edges])
    ax.set_xticklabels([_short(2 ** (k - 1)) for k in edges], fontsize=7)
    ax.set_xlim(-0.6, len(counts) - 0.4)
    ax.set_xlabel("box size: sqrt(width x height) in pixels (bin edges; the first bar: under 1, the last: "
                  f"{_short(2 ** (len(counts) - 2))} and more)", fontsize=8)
    ax.set_ylabel("boxes", fontsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("box sizes (boxes with width or height <= 0 not counted)", fontsize=9)
    _legend_outside(ax)
    fig.tight_layout()
    return fig


def codes_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return _png(codes_figure(rows))


def codes_figure(rows: Sequence[Mapping[str, Any]]) -> Any:
    """Samples affected per code, coloured by severity."""
    plt = _pyplot()
    Patch, MaxNLocator = _mpl()
    fig, ax = plt.subplots(figsize=(6.5, max(1.8, 0.32 * len(rows) + 1.1)))
    names = [f"{r['code']} {str(r.get('title', ''))[:38]}" for r in rows]
    vals = [int(r.get("samples", 0)) for r in rows]
    sev = [str(r.get("severity")) for r in rows]
    ax.barh(range(len(rows)), vals, 0.7, color=[SEVERITY_COLOR.get(s, NEUTRAL) for s in sev], edgecolor="black",
            linewidth=0.4)
    handles = [Patch(facecolor=SEVERITY_COLOR[s], edgecolor="black", label=s) for s in ("error", "warning", "info")
               if s in sev]
    for k, v in enumerate(vals):
        ax.text(v, k, f" {v}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    if vals and min(vals) > 0 and max(vals) / min(vals) > 100:
        ax.set_xscale("log")  # its own locator: integer steps on a log axis crowd the labels
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("samples affected", fontsize=8)
    ax.set_title("data bugs per code", fontsize=9)
    _legend_outside(ax, handles=handles)
    fig.tight_layout()
    return fig
