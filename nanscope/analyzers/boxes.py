"""Boxes and matching: NS201 invalid target boxes, NS202 non-finite predicted boxes, NS203 non-finite
matching costs, NS204 images without boxes.

Target boxes are the batch's normalized cxcywh boxes; predicted boxes are the captured per-layer
boxes (`ctx.boxes`: 'dec0'.., 'enc'). Matching costs are recomputed with `nanscope.criterion.matcher.matching_costs`
the way both matchers see them: the naive one over all text columns and the masked (fixed) one over
valid columns, each with the focal-BCE class cost (MMDetection) and the normalized-row class cost
(Open-GroundingDino, transformers).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import register
from nanscope.findings import Finding, Severity

MAX_WHERE = 8  # locations listed per finding; `count` has them all
PIXEL_HINT = 2.0  # a coordinate above this is no normalized value: absolute pixels
RANGE_TOL = 1e-4  # normalized values may exceed [0, 1] by this much (float rounding)
EDGE_TOL = 0.02  # how far a cxcywh box may reach past the image edge before it is suspicious
XYXY_SHARE = 0.75  # share of boxes with w > cx and h > cy (x2 > x1, y2 > y1 read as cxcywh) that suggests xyxy
MATCHERS = (("naive", False), ("masked", True))  # masked=False: every text column, as unmasked references do
CLASS_COSTS = ("mmdet", "open-groundingdino")  # presets standing for the two class-cost kinds
TERMS = ("class", "bbox", "giou")
_MATCHER_ORDER = [n for n, _ in MATCHERS]


def _r(x: Tensor) -> list[float | str]:
    """Box values for `where`: rounded, non-finite ones as 'nan' / 'inf' / '-inf' (JSON has no NaN)."""
    return [round(v, 4) if math.isfinite(v) else str(v) for v in x.float().tolist()]


def target_box_problems(boxes: list[Tensor]) -> dict[tuple[int, int], tuple[str, str]]:
    """(image, box) -> (kind, why) for every box that is not a valid normalized cxcywh box.

    boxes: one [N_i, 4] tensor per image. kind is one of 'non-finite', 'absolute pixels', 'width or
    height <= 0', 'outside [0, 1]', 'xyxy', 'past the image'. Each box is judged on its own: a box whose
    cxcywh extent reaches past the image by more than EDGE_TOL is invalid whatever the others do ('xyxy'
    when, read as x1, y1, x2, y2, it is a valid box: w > cx and h > cy); the message adds the batch's
    share of xyxy-like boxes when most are.
    """
    out: dict[tuple[int, int], tuple[str, str]] = {}
    candidates: list[tuple[int, int, float]] = []  # in range, but reaching past the image edge
    in_range = xyxy_like = 0
    for i, b in enumerate(boxes):
        b = b.detach().float().cpu()
        for j in range(b.shape[0]):
            cx, cy, w, h = (float(v) for v in b[j])
            top, low = float(b[j].max()), float(b[j].min())
            if not bool(torch.isfinite(b[j]).all()):
                out[(i, j)] = ("non-finite", "non-finite (NaN/inf)")
            elif top > PIXEL_HINT and low >= 0:
                out[(i, j)] = ("absolute pixels", f"absolute pixels? values up to {top:.4g}; expected normalized [0, 1]")
            elif w <= 0 or h <= 0:
                out[(i, j)] = ("width or height <= 0", f"width or height <= 0 (w={w:.4g}, h={h:.4g})")
            elif low < -RANGE_TOL or top > 1 + RANGE_TOL:
                out[(i, j)] = ("outside [0, 1]", "outside [0, 1]: expected normalized cx, cy, w, h")
            else:
                in_range += 1
                xyxy_like += (w > cx and h > cy)
                reach = max(w / 2 - cx, cx + w / 2 - 1, h / 2 - cy, cy + h / 2 - 1)
                if reach > EDGE_TOL:
                    candidates.append((i, j, reach))
    batch_xyxy = xyxy_like >= XYXY_SHARE * in_range
    share = f"; {xyxy_like} of {in_range} boxes have x2 > x1 and y2 > y1" if batch_xyxy else ""
    for i, j, reach in candidates:  # each box on its own: a cxcywh box reaching past the image is invalid
        cx, cy, w, h = (float(v) for v in boxes[i][j].detach().float().cpu())
        if w > cx and h > cy:  # as x1, y1, x2, y2 it is a valid box inside the image
            out[(i, j)] = ("xyxy", f"looks like xyxy (x1, y1, x2, y2): read as cxcywh it reaches {reach:.3g} past the "
                                   f"image{share}")
        else:
            out[(i, j)] = ("past the image", f"read as cxcywh it reaches {reach:.3g} past the image edge; expected a "
                                             f"box inside [0, 1]{share}")
    return out


@register("NS201")
def invalid_target_boxes(ctx: AnalysisContext) -> list[Finding]:
    problems = target_box_problems([t.boxes for t in ctx.batch.targets])
    if not problems:
        return []
    where = [{"image": i, "box": j, "phrase": ctx.phrase_of(i, j), "value": _r(ctx.batch.targets[i].boxes[j]),
              "why": why} for (i, j), (_kind, why) in sorted(problems.items())]
    kinds: dict[str, int] = {}
    for kind, _why in problems.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    msg = (f"{len(where)} of {ctx.batch.num_boxes} target boxes are not valid normalized cxcywh boxes "
           f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}): L1 and GIoU losses and matching costs "
           "on them are NaN or meaningless.")
    msg = _with_note(ctx, "NS201", msg, {"kinds": kinds})
    return [Finding("NS201", Severity.ERROR, len(where), msg, tuple(where[:MAX_WHERE]), data={"kinds": kinds})]


def _with_note(ctx: AnalysisContext, code: str, message: str, data: dict[str, Any]) -> str:
    """`message` plus what the replay's stack says its own code does with the problem."""
    note = ctx.stack.finding_note(code, data) if ctx.stack is not None else None
    return f"{message} {note}" if note else message


def _forward_order(layers: list[str]) -> list[str]:
    """Layers in the order the forward computes them: encoder proposals first, then decoder layers."""
    return [n for n in layers if n == "enc"] + [n for n in layers if n != "enc"]


@register("NS202", needs=("boxes",))
def nonfinite_pred_boxes(ctx: AnalysisContext) -> list[Finding]:
    assert ctx.boxes is not None
    where = []
    per_layer: dict[str, list[int]] = {}
    for layer in _forward_order(list(ctx.boxes)):
        bad = ~torch.isfinite(ctx.boxes[layer].detach()).all(-1).cpu()  # [B, Q]
        per_layer[layer] = bad.sum(-1).tolist()
        for i, n in enumerate(per_layer[layer]):
            if n:
                where.append({"layer": layer, "image": i, "query": int(bad[i].nonzero()[0, 0]), "nonfinite": n})
    if not where:
        return []
    total = sum(w["nonfinite"] for w in where)
    layers = [n for n, c in per_layer.items() if sum(c)]
    msg = (f"{total} predicted boxes (query x layer) are non-finite, in layer(s) {', '.join(layers)}; the first in "
           f"forward order is {layers[0]}. Every box cost and box loss on them is NaN.")
    return [Finding("NS202", Severity.ERROR, total, msg, tuple(where[:MAX_WHERE]), data={"per_layer": per_layer})]


def _targets(ctx: AnalysisContext) -> list[dict[str, Tensor]]:
    return [{"boxes": t.boxes, "positive_map": info.positive_map} for t, info in zip(ctx.batch.targets, ctx.texts)]


def nonfinite_costs(ctx: AnalysisContext) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """Non-finite matching costs of every layer, and the empty positive rows.

    Returns (groups, empty): groups are dicts {layer, image, box, term, matchers, queries [Q] bool};
    empty lists (image, box) whose positive-map row is all zero, which an unguarded row-normalizing
    matcher turns into 0/0 (nanscope's matcher clamps it, so it does not show up in `groups`).
    """
    from nanscope.criterion.matcher import matching_costs

    assert ctx.logits is not None and ctx.boxes is not None
    targets = _targets(ctx)
    groups: dict[tuple[str, int, int, str], dict[str, Any]] = {}
    empty: list[tuple[int, int]] = []
    for layer in _forward_order([n for n in ctx.logits if n in ctx.boxes]):
        outputs: dict[str, Any] = {"pred_logits": ctx.logits[layer].detach(), "pred_boxes": ctx.boxes[layer].detach()}
        if ctx.text_mask is not None:
            outputs["text_token_mask"] = ctx.text_mask
        for mname, masked in MATCHERS:
            for preset in CLASS_COSTS:
                costs = matching_costs(outputs, targets, preset=preset, masked=masked)
                first = preset == CLASS_COSTS[0] and not masked  # box terms do not depend on preset or mask
                for i, c in enumerate(costs):
                    if first:
                        empty.extend((i, j) for j in c["empty_rows"].cpu().nonzero().flatten().tolist()
                                     if (i, j) not in empty)
                    for term in TERMS if first else ("class",):
                        bad = ~torch.isfinite(c[term].detach()).cpu()  # [Q, N]
                        for j in bad.any(0).nonzero().flatten().tolist():
                            g = groups.setdefault((layer, i, j, term), {
                                "layer": layer, "image": i, "box": j, "term": term, "matchers": [],
                                "queries": bad[:, j]})
                            for label in ((mname,) if term == "class" else tuple(n for n, _ in MATCHERS)):
                                if label not in g["matchers"]:
                                    g["matchers"].append(label)
    return list(groups.values()), sorted(set(empty))


@register("NS203", needs=("logits", "boxes"))
def nonfinite_matching_cost(ctx: AnalysisContext) -> list[Finding]:
    groups, empty = nonfinite_costs(ctx)
    error = ctx.notes.get("criterion_error")
    if not groups and not empty and not error:
        return []
    where: list[dict[str, Any]] = []
    merged: dict[tuple[str, int, int], dict[str, Any]] = {}
    for g in groups:
        m = merged.setdefault((g["layer"], g["image"], g["box"]), {
            "layer": g["layer"], "image": g["image"], "box": g["box"], "phrase": ctx.phrase_of(g["image"], g["box"]),
            "terms": [], "matchers": [], "rows": torch.zeros_like(g["queries"])})
        m["terms"].append(g["term"])
        m["matchers"] += [x for x in g["matchers"] if x not in m["matchers"]]
        m["rows"] |= g["queries"]
    cells = 0
    for m in merged.values():
        rows, terms, matchers = m.pop("rows"), m.pop("terms"), m.pop("matchers")
        cells += int(rows.sum())
        where.append({**m, "term": "+".join(terms), "matcher": " and ".join(sorted(matchers, key=_MATCHER_ORDER.index)),
                      "query": int(rows.nonzero()[0, 0]), "nonfinite": int(rows.sum())})
    for i, j in empty:
        where.append({"image": i, "box": j, "phrase": ctx.phrase_of(i, j), "term": "class",
                      "matcher": "row-normalizing (row / row.sum())", "why": "empty positive row: 0/0 for every query"})
    parts = []
    if merged:
        layers = sorted({w["layer"] for w in merged.values()}, key=_forward_order(list(ctx.logits or {})).index)
        terms = sorted({g["term"] for g in groups}, key=TERMS.index)
        parts.append(f"{cells} (query, box) matching costs are non-finite in layer(s) {', '.join(layers)} "
                     f"(term(s) {', '.join(terms)}); scipy's linear_sum_assignment raises 'matrix contains invalid "
                     "numeric entries' on them.")
    if empty:
        parts.append(f"{len(empty)} box(es) have an empty positive-map row: matchers that divide each row by its "
                     "sum without a guard (transformers' GroundingDinoHungarianMatcher) get NaN class costs for "
                     "every query (see NS103).")
    if error:
        if not merged:
            parts.append("nanscope's recomputed costs are finite here, so your matcher computes its costs "
                         "differently: look at its cost terms.")
        parts.append(f"Your criterion raised: {error}")
    severity = Severity.ERROR if merged or error else Severity.WARNING
    count = max(1, cells + len(empty))
    parts = [_with_note(ctx, "NS203", " ".join(parts), {"cells": cells, "empty_rows": len(empty)})]
    return [Finding("NS203", severity, count, " ".join(parts), tuple(where[:MAX_WHERE]),
                    data={"empty_rows": [list(x) for x in empty]})]


@register("NS204")
def images_without_boxes(ctx: AnalysisContext) -> list[Finding]:
    where = [{"image": i, "caption": c if len(c) <= 60 else c[:57] + "..."}
             for i, (c, t) in enumerate(zip(ctx.batch.captions, ctx.batch.targets)) if t.boxes.shape[0] == 0]
    if not where:
        return []
    msg = (f"{len(where)} of {len(ctx.batch)} image(s) have no target boxes: every query is a negative there. "
           "Loss normalizers must be clamped to at least 1 (DETR, MMDetection and nanscope's criterion do), "
           "otherwise a batch of such images divides by 0.")
    return [Finding("NS204", Severity.INFO, len(where), msg, tuple(where[:MAX_WHERE]))]
