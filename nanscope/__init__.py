"""nanscope: why did the GroundingDINO loss go NaN, the fix, and the proof.

Names are imported lazily so `nanscope --help` does not pay for torch and groundingdino.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "inspect": "nanscope.diagnose",
    "Result": "nanscope.result",
    "Check": "nanscope.result",
    "Finding": "nanscope.findings",
    "Severity": "nanscope.findings",
    "CATALOGUE": "nanscope.findings",
    "NanscopeError": "nanscope.errors",
    "InputError": "nanscope.errors",
    "Batch": "nanscope.batch",
    "load_batch": "nanscope.batch",
    "save_batch": "nanscope.batch",
    "capture": "nanscope.capture",
    "build_model": "nanscope.models.groundingdino",
    "find_groundingdino": "nanscope.models.groundingdino",
    "write_demo": "nanscope.models.demo",
    "verify_fix": "nanscope.verify",
    "verify_replay": "nanscope.verify",
    "SetCriterion": "nanscope.criterion",
    "NaiveCriterion": "nanscope.criterion",
    "HungarianMatcher": "nanscope.matcher",
    "matching_costs": "nanscope.matcher",
    "text_validity": "nanscope.text_mask",
    "PRESETS": "nanscope.presets",
    "CriterionPreset": "nanscope.presets",
    "trace_nonfinite": "nanscope.trace",
    "trace_findings": "nanscope.trace",
    "TraceResult": "nanscope.trace",
    "Origin": "nanscope.trace",
    "watch": "nanscope.watch",
    "Watcher": "nanscope.watch",
    "WatchOptions": "nanscope.watch",
    "WatchReport": "nanscope.watch_report",
    "NonFiniteStepError": "nanscope.watch_report",
    "merge_rank_dumps": "nanscope.ranks",
    "restore_rng": "nanscope.snapshot",
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
