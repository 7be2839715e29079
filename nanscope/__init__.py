"""nanscope: why did the GroundingDINO loss go NaN, the fix, and the proof.

Names are imported lazily so `nanscope --help` does not pay for torch and groundingdino.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "inspect": "nanscope.replay.diagnose",
    "Result": "nanscope.result",
    "Check": "nanscope.result",
    "Finding": "nanscope.findings",
    "Severity": "nanscope.findings",
    "CATALOGUE": "nanscope.findings",
    "NanscopeError": "nanscope.errors",
    "InputError": "nanscope.errors",
    "Batch": "nanscope.replay.batch",
    "load_batch": "nanscope.replay.batch",
    "save_batch": "nanscope.replay.batch",
    "capture": "nanscope.stacks.capture",
    "build_model": "nanscope.stacks.groundingdino.stack",
    "find_groundingdino": "nanscope.stacks.groundingdino.stack",
    "write_demo": "nanscope.stacks.groundingdino.demo",
    "verify_fix": "nanscope.verify.pipeline",
    "verify_replay": "nanscope.verify.pipeline",
    "SetCriterion": "nanscope.criterion.set_criterion",
    "NaiveCriterion": "nanscope.criterion.set_criterion",
    "HungarianMatcher": "nanscope.criterion.matcher",
    "matching_costs": "nanscope.criterion.matcher",
    "text_validity": "nanscope.criterion.text_mask",
    "PRESETS": "nanscope.criterion.presets",
    "CriterionPreset": "nanscope.criterion.presets",
    "trace_nonfinite": "nanscope.trace.tracer",
    "trace_findings": "nanscope.trace.tracer",
    "TraceResult": "nanscope.trace.tracer",
    "Origin": "nanscope.trace.tracer",
    "watch": "nanscope.watch.sentinel",
    "attach": "nanscope.watch.attachment",
    "Watcher": "nanscope.watch.sentinel",
    "WatchOptions": "nanscope.watch.sentinel",
    "WatchReport": "nanscope.watch.report",
    "NonFiniteStepError": "nanscope.watch.report",
    "merge_rank_dumps": "nanscope.watch.ranks",
    "restore_rng": "nanscope.watch.snapshot",
    "render_html": "nanscope.report.html",
    "read_result": "nanscope.report.json_io",
    "write_result": "nanscope.report.json_io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nanscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
