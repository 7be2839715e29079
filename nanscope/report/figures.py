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
from typing import Any, Iterable, Mapping, Sequence


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
