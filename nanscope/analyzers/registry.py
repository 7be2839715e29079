"""The analyzer registry: small functions keyed by their stable finding code.

    @register("NS101")
    def padded_logits(ctx: AnalysisContext) -> list[Finding]: ...

Registering a code twice is an error; asking for an unknown code lists the valid ones. Analyzers never
print; they return findings (possibly none) for the code they are registered under.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from nanscope.analyzers.context import AnalysisContext
from nanscope.errors import UnknownCodeError
from nanscope.findings import CATALOGUE, Finding, sort_findings

AnalyzerFn = Callable[[AnalysisContext], list[Finding]]


@dataclass(frozen=True)
class Analyzer:
    code: str
    fn: AnalyzerFn
    needs: tuple[str, ...]  # context fields that must be set for the analyzer to run

    @property
    def name(self) -> str:
        return self.fn.__name__


_REGISTRY: dict[str, Analyzer] = {}


def register(code: str, *, needs: Iterable[str] = ()) -> Callable[[AnalyzerFn], AnalyzerFn]:
    if code not in CATALOGUE:
        raise UnknownCodeError(f"cannot register analyzer for unknown code {code!r}; add it to findings.CATALOGUE first")

    def deco(fn: AnalyzerFn) -> AnalyzerFn:
        if code in _REGISTRY:
            raise ValueError(f"analyzer for {code} registered twice ({_REGISTRY[code].name} and {fn.__name__})")
        _REGISTRY[code] = Analyzer(code, fn, tuple(needs))
        return fn

    return deco


def registered() -> dict[str, Analyzer]:
    """All analyzers, keyed by code (imports the built-in families first)."""
    import nanscope.analyzers  # noqa: F401  (registers the built-ins)

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
