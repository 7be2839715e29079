"""NS401-NS404: a finite loss that supervises the wrong thing, from the measurements in
`nanscope.replay.supervision` (gradients on the logits, counterfactual targets, the user's matcher)."""

from __future__ import annotations

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
    # Both measurements must agree: no logit is pushed up (a saturated positive also has a zero gradient,
    # so this alone is not enough) and zeroing every positive map leaves the term unchanged.
    blind = [g for g in probe.gradients if g.pushed_up == 0 and g.unchanged_without_positives]
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
