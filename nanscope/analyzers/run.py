"""Run the registered analyzers: the built-in families are imported here, so they are registered first.

Asking for an unknown code lists the valid ones.
"""

from __future__ import annotations

from typing import Iterable

from nanscope.analyzers import (  # noqa: F401  (register the built-ins)
    boxes, checkpoint_fit, loss, numerics, origin, supervision, targets, text, transformers,
)
from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import _REGISTRY, Analyzer
from nanscope.errors import UnknownCodeError
from nanscope.findings import Finding, sort_findings


def registered() -> dict[str, Analyzer]:
    """All analyzers, keyed by code: the built-in families (imported above) and any registered since."""
    return dict(sorted(_REGISTRY.items()))


def get(code: str) -> Analyzer:
    reg = registered()
    if code not in reg:
        raise UnknownCodeError(f"no analyzer for code {code!r}; analyzers exist for {', '.join(reg)}")
    return reg[code]


def run_analyzers(
    ctx: AnalysisContext,
    *,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
) -> list[Finding]:
    """Run every applicable analyzer (those whose `needs` are present), filtered by select/ignore codes."""
    reg = registered()
    chosen = set(select) if select else set(reg)
    chosen -= set(ignore or ())
    findings: list[Finding] = []
    for code, an in reg.items():
        if code not in chosen:
            continue
        if any(getattr(ctx, n, None) is None for n in an.needs):
            continue
        findings.extend(an.fn(ctx))
    return sort_findings(f for f in findings if f.code in chosen)
