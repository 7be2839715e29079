"""NS306: the checkpoint does not fit the model (groundingdino's strict=False load hides this)."""

from __future__ import annotations

from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import register
from nanscope.findings import Finding, Severity

SHOW = 5  # key names listed per kind


@register("NS306", needs=("key_fit",))
def checkpoint_fit(ctx: AnalysisContext) -> list[Finding]:
    fit = ctx.key_fit
    if fit.clean:
        if not fit.benign:
            return []
        where = tuple({"param": k, "why": why} for k, why in fit.benign[:SHOW])
        msg = (f"{len(fit.benign)} key(s) in the checkpoint are not used by this model and are harmless "
               f"({', '.join(k for k, _ in fit.benign[:SHOW])}); every model weight was loaded.")
        return [Finding("NS306", Severity.INFO, len(fit.benign), msg, where,
                        hint="Nothing to fix.", data={"benign": [list(b) for b in fit.benign]})]
    where = [{"param": k, "why": "missing"} for k in fit.missing[:SHOW]]
    where += [{"param": k, "why": "unexpected"} for k in fit.unexpected[:SHOW]]
    where += [{"param": k, "why": f"shape {list(a)} in file, {list(b)} in model"} for k, a, b in fit.mismatched[:SHOW]]
    count = len(fit.missing) + len(fit.unexpected) + len(fit.mismatched)
    msg = (f"checkpoint does not fit the model: {len(fit.missing)} missing (left at random init), "
           f"{len(fit.unexpected)} unexpected, {len(fit.mismatched)} mis-shaped keys; "
           f"{len(fit.matched)} loaded.")
    data = {"missing": list(fit.missing), "unexpected": list(fit.unexpected),
            "mismatched": [[k, list(a), list(b)] for k, a, b in fit.mismatched], "matched": len(fit.matched),
            "benign": [list(b) for b in fit.benign]}
    return [Finding("NS306", Severity.ERROR, count, msg, tuple(where), data=data)]
