"""The origin trace: the first operation whose output went non-finite, in the forward and in the backward.

`trace_nonfinite(model, run)` replays `run()` (forward + loss, then backward) under an op-level dispatch mode
(`_mode.py` observes, `_rules.py` decides) and names the op, the module and the user's file:line.
"""

from nanscope.trace.records import Frame, InfSource, Origin, TraceResult
from nanscope.trace.tracer import describe, trace_findings, trace_nonfinite

__all__ = ["Frame", "InfSource", "Origin", "TraceResult", "describe", "trace_findings", "trace_nonfinite"]
