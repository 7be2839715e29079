"""The analyzer registry: small functions keyed by their stable finding code.

    @register("NS101")
    def padded_logits(ctx: AnalysisContext) -> list[Finding]: ...

Registering a code twice is an error. Analyzers never print; they return findings (possibly none) for the
code they are registered under. This module only holds the table; `nanscope.analyzers.run` imports the
built-in families (which import this module to register) and runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from nanscope.analyzers.context import AnalysisContext
from nanscope.errors import UnknownCodeError
from nanscope.findings import CATALOGUE, Finding

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
