"""The origin trace: the first operation whose output went non-finite, in the forward and in the backward.

`trace_nonfinite(model, run)` runs `run()` (forward + loss, then backward) with module-level flags and the loss code
op by op (`_calls.py`, `_loss.py`), then replays only the module calls whose forward or backward went non-finite
under the op-level dispatch mode (`_replay.py`, `_backward.py`; `_phases.py` decides), and names the op, the module
and the user's file:line (`_mode.py` observes, `_rules.py` decides).
"""

from nanscope.trace.records import Frame, InfSource, Origin, TraceResult
from nanscope.trace.tracer import describe, trace_findings, trace_nonfinite

__all__ = ["Frame", "InfSource", "Origin", "TraceResult", "describe", "trace_findings", "trace_nonfinite"]
