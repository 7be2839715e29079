"""NS001: a non-finite loss term of the user's criterion (the symptom the user saw)."""

from __future__ import annotations

import torch

from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import register
from nanscope.findings import Finding, Severity
from nanscope.terms import term_layer


@register("NS001", needs=("loss_terms",))
def nonfinite_loss(ctx: AnalysisContext) -> list[Finding]:
    assert ctx.loss_terms is not None
    where = []
    for name, value in sorted(ctx.loss_terms.items()):
        v = torch.as_tensor(value).detach()
        if bool(torch.isfinite(v).all()):
            continue
        kind = "nan" if bool(torch.isnan(v).any()) else "inf"
        where.append({"term": name, "layer": term_layer(name), "value": kind})
    if not where:
        return []
    msg = (f"{len(where)} of {len(ctx.loss_terms)} loss terms of {ctx.criterion_name or 'the criterion'} are "
           f"non-finite: {', '.join(w['term'] for w in where)}.")
    return [Finding("NS001", Severity.ERROR, len(where), msg, tuple(where))]
