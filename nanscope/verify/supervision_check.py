"""Check 10 of verify-fix: the fix supervises what it should (no NS401, NS402 or NS403 on after).

A fix that trades the NaN for a loss over matched queries only, for targets without token labels, or
for a matcher that hides non-finite costs, is not a fix: the loss is finite and trains the wrong thing.
The measurements are `nanscope.replay.supervision`'s, on the replayed outputs (the model is not re-run).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from nanscope import progress
from nanscope.result import Check

SUPERVISION_ERRORS = ("NS401", "NS402", "NS403")  # a fix that introduces one of these is not fixed


@progress.staged("check 10 (after supervises what it should)")
def check_supervision(crit: Any, name: str, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]],
                      batch: Any, texts: Sequence[Any], *, finite: bool,
                      extras: Mapping[str, Any] | None = None) -> Check:
    """PASS when after's classification terms reach the unmatched queries, learn the positives, and its
    matcher (if any) does not match a box with an undefined cost to an arbitrary query."""
    title = "after supervises what it should"
    if not finite:
        return Check(10, title, True, "not measured: after is non-finite on this batch (check 2 fails)",
                     {"measured": False})
    from nanscope.analyzers.context import AnalysisContext
    from nanscope.analyzers import get
    from nanscope.replay.diagnose import probe_criterion

    probe = probe_criterion(crit, name, dict(outputs), list(targets), list(texts), dict(extras or {}))
    ctx = AnalysisContext(batch=batch, texts=list(texts), supervision=probe)
    findings = [f for code in SUPERVISION_ERRORS for f in get(code).fn(ctx)]
    coverage = {g.term: round(g.share, 4) for g in probe.gradients}
    numbers = {"measured": True, "codes": [f.code for f in findings], "coverage": coverage}
    if findings:
        return Check(10, title, False, "; ".join(f"{f.code} {f.message}" for f in findings), numbers)
    terms = ", ".join(f"{k} reaches {100 * v:.0f}% of query rows" for k, v in list(coverage.items())[:3])
    return Check(10, title, True, f"no NS401/NS402/NS403: {terms or 'no classification term'}", numbers)
