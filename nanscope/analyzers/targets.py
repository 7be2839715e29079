"""Positive-map targets: NS103 empty rows, NS105 non-binary rows.

A box's positive-map row marks the text tokens of its phrase. A row with no positive left (phrase
not in the caption, cut entirely by truncation, a span over whitespace only, or tokens the model
masks) gives the box no class target, and a matcher that normalizes rows (`row / row.sum()`, as
Open-GroundingDino and transformers do) divides 0 by 0 for every query.
"""

from __future__ import annotations

from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import register
from nanscope.findings import Finding, Severity

MAX_WHERE = 8  # locations listed per finding; `count` has them all
BINARY_TOL = 1e-6  # a value within this of 0 or 1 counts as binary


def empty_reason(ctx: AnalysisContext, image: int, box: int) -> str | None:
    """Why box `box` of image `image` has no positive at a valid text position, or None if it has one."""
    info = ctx.texts[image]
    bt = info.boxes[box]
    if not bt.found:
        return "phrase not found in the caption"
    if not bt.tokens and not bt.spans:  # the trainer's own positive map (no phrase, no span)
        return "the batch's own positive-map row is all zero"
    if not bt.tokens:
        return "span covers no token (whitespace or characters the tokenizer drops)"
    if not bt.kept:
        return f"truncated: all {len(bt.tokens)} token(s) fall past max_text_len={ctx.max_text_len}"
    if ctx.text_mask is not None and not any(bool(ctx.text_mask[image, t]) for t in bt.kept):
        return "all its tokens are masked by the model's text_token_mask"
    if not bool((info.positive_map[box] > 0).any()):
        return "its positive-map row is all zero"
    return None


@register("NS103")
def empty_positive_rows(ctx: AnalysisContext) -> list[Finding]:
    where = []
    for i, info in enumerate(ctx.texts):
        for bt in info.boxes:
            why = empty_reason(ctx, i, bt.box)
            if why is None:
                continue
            w = {"image": i, "box": bt.box, "phrase": bt.phrase, "why": why}
            if bt.tokens:
                w["tokens"] = list(bt.tokens)
                w["token_text"] = " ".join(info.token_text(t) for t in bt.tokens)
            where.append(w)
    if not where:
        return []
    images = sorted({w["image"] for w in where})
    msg = (f"{len(where)} target box(es) in image(s) {', '.join(map(str, images))} have an empty positive-map "
           "row: the box has no class target, and a matcher that normalizes rows (row / row.sum(), "
           "Open-GroundingDino, transformers) divides 0 by 0, a NaN cost for every query.")
    return [Finding("NS103", Severity.ERROR, len(where), msg, tuple(where[:MAX_WHERE]),
                    data={"boxes": [[w["image"], w["box"]] for w in where]})]


@register("NS105")
def non_binary_positive_map(ctx: AnalysisContext) -> list[Finding]:
    """The maps a criterion is given (`ctx.texts[i].positive_map`, [N, T]) hold values other than 0 and 1."""
    where = []
    n_values = 0
    normalized = 0
    for i, info in enumerate(ctx.texts):
        pmap = info.positive_map.detach().float()
        if pmap.numel() == 0:
            continue
        off = ~((pmap.abs() <= BINARY_TOL) | ((pmap - 1).abs() <= BINARY_TOL))  # [N, T]
        for j in off.any(-1).nonzero().flatten().tolist():
            row = pmap[j]
            vals = row[off[j]]
            n_values += int(off[j].sum())
            positive = row > BINARY_TOL
            looks_normalized = bool(positive.any()) and abs(float(row.sum()) - 1.0) < 1e-3
            normalized += looks_normalized
            toks = positive.nonzero().flatten().tolist()
            where.append({"image": i, "box": j, "phrase": ctx.phrase_of(i, j), "tokens": toks,
                          "token_text": " ".join(ctx.token_text(i, t) for t in toks),
                          "values": sorted({round(float(v), 4) for v in vals.tolist()})[:4],
                          "why": "row sums to 1 (normalized)" if looks_normalized else "fractional or out-of-range values"})
    if not where:
        return []
    msg = (f"{len(where)} positive-map row(s) hold {n_values} value(s) other than 0 and 1"
           + (f"; {normalized} look normalized (groundingdino's create_positive_map divides rows by their sum)"
              if normalized else "")
           + ": as focal-loss targets they ask for probabilities below 1 at the phrase's tokens, which weakens "
           "(or, with values outside [0, 1], breaks) the classification signal.")
    return [Finding("NS105", Severity.WARNING, len(where), msg, tuple(where[:MAX_WHERE]))]

