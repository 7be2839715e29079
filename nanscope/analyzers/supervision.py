"""NS401-NS406: a finite loss that supervises the wrong thing, from the measurements in
`nanscope.replay.supervision` (gradients on the logits, counterfactual targets, the user's matcher)."""

from __future__ import annotations

import re

import torch

from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import register
from nanscope.findings import Finding, Severity

COVERAGE_MIN = 0.5  # a classification term reaching fewer query rows than this share skips the negatives
MAX_WHERE = 8


@register("NS401", needs=("supervision",))
def negatives_never_trained(ctx: AnalysisContext) -> list[Finding]:
    probe = ctx.supervision
    low = [g for g in probe.gradients if g.share < COVERAGE_MIN]
    if not low:
        return []
    parts = [f"{g.term}: gradient reaches {g.rows_reached} of {g.rows_total} query rows ({100 * g.share:.2f}%)"
             for g in low]
    return [Finding(
        "NS401", Severity.ERROR, count=len(low),
        message="; ".join(parts[:4]) + f"; unmatched queries never get a negative target in {probe.criterion}",
        where=tuple({"term": g.term, "layer": g.layer, "rows_reached": g.rows_reached, "rows": g.rows_total,
                     "per_image": list(g.rows_per_image)} for g in low[:MAX_WHERE]),
        data={"coverage": {g.term: {"layer": g.layer, "rows_reached": g.rows_reached, "rows": g.rows_total}
                           for g in probe.gradients}})]


@register("NS402", needs=("supervision",))
def positives_ignored(ctx: AnalysisContext) -> list[Finding]:
    probe = ctx.supervision
    if probe.positives_in_batch == 0:
        return []
    # Both measurements must agree: no logit is pushed up, neither at the real logits nor with every finite
    # logit at 0 (a saturated positive has no gradient at the real ones), and zeroing every positive map
    # leaves the term unchanged (a criterion may rebuild its positives from the captions, so neither alone).
    blind = [g for g in probe.gradients
             if g.pushed_up == 0 and not g.pushed_up_neutral and g.unchanged_without_positives]
    if not blind:
        return []
    parts = []
    for g in blind[:4]:
        parts.append(f"{g.term} (layer {g.layer}) pushes all {g.cells_reached} logits it reaches down and does not "
                     "change when every positive map is zeroed")
    return [Finding(
        "NS402", Severity.ERROR, count=len(blind),
        message="; ".join(parts) + f", although {probe.positives_in_batch} target boxes have positive tokens: "
                "it trains every query towards 'no object'",
        where=tuple({"term": g.term, "layer": g.layer, "unchanged_without_positives": g.unchanged_without_positives}
                    for g in blind[:MAX_WHERE]))]


@register("NS403", needs=("supervision",))
def matcher_hides_nonfinite(ctx: AnalysisContext) -> list[Finding]:
    probe = ctx.supervision
    if not probe.hidden_matches:
        return []
    where = []
    for h in probe.hidden_matches[:MAX_WHERE]:
        w = {"image": h.image, "box": h.box, "phrase": ctx.phrase_of(h.image, h.box), "query": h.query, "cost": h.why}
        if h.guarded_query is not None:
            w["guarded_query"] = h.guarded_query
        where.append(w)
    h = probe.hidden_matches[0]
    guarded = (f"nanscope's guarded matcher (class cost 0 for an empty row, matched by box costs) gives query "
               f"{h.guarded_query}" if h.guarded_query is not None else "a guarded matcher refuses the image")
    return [Finding(
        "NS403", Severity.ERROR, count=len(probe.hidden_matches),
        message=f"the matcher of {probe.criterion} matched {len(probe.hidden_matches)} box(es) whose matching cost "
                f"is undefined without raising: image {h.image} box {h.box} ({h.why}) went to query {h.query}; "
                f"{guarded}. Such a box trains an arbitrary query on an empty or non-finite target",
        where=tuple(where))]


@register("NS404", needs=("supervision",))
def loss_scale(ctx: AnalysisContext) -> list[Finding]:
    probe = ctx.supervision
    drowning = probe.scale
    if not drowning:
        return []
    parts = []
    for top, nxt, ratio, why in drowning[:4]:
        text = f"{top} is {ratio:.0f}x {nxt} (weighted)"
        if why:
            text += f"; it matches the focal sum divided by {why}"
        parts.append(text)
    return [Finding(
        "NS404", Severity.WARNING, count=len(drowning), message="; ".join(parts) + " on a batch where every term is finite",
        where=tuple({"term": t, "next": n, "ratio": round(r, 1), **({"normalizer": w} if w else {})}
                    for t, n, r, w in drowning[:MAX_WHERE]))]


def _user_map(target: object) -> torch.Tensor | None:
    """The trainer's own positive map of a target, when the batch also has phrases or spans to compare with."""

    if getattr(target, "phrases", None) is None and getattr(target, "spans", None) is None:
        return None  # the map is the only token information: nanscope's map *is* the user's
    pm = getattr(target, "positive_map", None)
    extra = getattr(target, "extra", None) or {}
    for key in ("positive_map", "token_labels"):
        if pm is None and isinstance(extra.get(key), torch.Tensor):
            pm = extra[key]
    return pm if isinstance(pm, torch.Tensor) and pm.dim() == 2 else None


def _span_text(tokens: list[int]) -> str:
    if not tokens:
        return "no token"
    runs, start = [], tokens[0]
    for a, b in zip(tokens, tokens[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return "token" + ("s " if len(tokens) > 1 else " ") + ", ".join(runs)


@register("NS405")
def targets_disagree_with_tokenizer(ctx: AnalysisContext) -> list[Finding]:
    """A trainer's own positive map against the map of the same phrases/spans under the model's tokenizer."""
    where, count = [], 0
    for i, (target, info) in enumerate(zip(ctx.batch.targets, ctx.texts)):
        user = _user_map(target)
        if user is None or user.shape[0] != len(info.boxes):
            continue
        width = min(int(user.shape[1]), ctx.max_text_len)
        for box in info.boxes:
            theirs = [int(t) for t in (user[box.box, :width] > 0).nonzero().flatten().tolist()]
            ours = [t for t in box.kept if t < width]
            if theirs == ours:
                continue
            count += 1
            if len(where) < MAX_WHERE:
                where.append({"image": i, "box": box.box, "phrase": box.phrase, "user_tokens": theirs,
                              "tokenizer_tokens": ours,
                              "tokens_text": [ctx.token_text(i, t) for t in ours]})
    if not count:
        return []
    w = where[0]
    return [Finding(
        "NS405", Severity.WARNING, count=count,
        message=f"{count} box(es) have a positive map that differs from the tokens the model's tokenizer gives "
                f"their phrase: image {w['image']} box {w['box']} '{w['phrase']}' is marked on "
                f"{_span_text(w['user_tokens'])}, the tokenizer puts it on {_span_text(w['tokenizer_tokens'])} "
                f"({' '.join(w['tokens_text'])})",
        where=tuple(where))]


@register("NS406")
def text_mask_not_truncated(ctx: AnalysisContext) -> list[Finding]:
    """The user's criterion crashed on a shape mismatch between max_text_len and an untruncated caption length."""
    text = str(ctx.notes.get("criterion_shape_error") or "")
    if not text:
        return []
    lengths = {t.num_tokens for t in ctx.texts if t.truncated}
    sizes = {int(x) for x in re.findall(r"\d+", text)}
    long = sorted(lengths & sizes)
    if not long or ctx.max_text_len not in sizes:
        return []
    images = [i for i, t in enumerate(ctx.texts) if t.num_tokens in long]
    return [Finding(
        "NS406", Severity.ERROR, count=len(images),
        message=f"{ctx.criterion_name or 'your criterion'} crashed comparing a width of {long[-1]} with "
                f"max_text_len={ctx.max_text_len}: {long[-1]} is the untruncated token count of the caption of image "
                f"{images[0]}, so the text mask it uses was built without truncation ({text[:200]})",
        where=tuple({"image": i, "tokens": ctx.texts[i].num_tokens, "max_text_len": ctx.max_text_len}
                    for i in images[:MAX_WHERE]))]
