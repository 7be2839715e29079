"""NS301 / NS302: where NaN and inf start, forward and backward, from the op-level trace (`--trace`).

The trace itself (`nanscope.trace.trace_nonfinite`) runs in `diagnose.run_trace`; these analyzers only
turn its `TraceResult` into findings, through `nanscope.trace.trace_findings`.
"""

from __future__ import annotations

from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import register
from nanscope.findings import Finding


def _trace_findings(ctx: AnalysisContext, code: str) -> list[Finding]:
    from nanscope.trace.tracer import trace_findings

    return [f for f in trace_findings(ctx.trace) if f.code == code]


@register("NS301", needs=("trace",))
def forward_origin(ctx: AnalysisContext) -> list[Finding]:
    return _trace_findings(ctx, "NS301")


@register("NS302", needs=("trace",))
def backward_origin(ctx: AnalysisContext) -> list[Finding]:
    return _trace_findings(ctx, "NS302")
