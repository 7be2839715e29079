"""GradScaler bookkeeping for the sentinel: overflow-skips counted, a collapsing scale is a failure (NS307).

A `torch.amp.GradScaler` only lowers its scale when it skipped a step (inf/NaN gradients), so a scale
lower than the previous check's marks the previous step as skipped. The scale is read on the device
(`scaler._scale`), never with `.item()`, until the sentinel reads its flags anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

MAX_LISTED_SKIPS = 100  # skipped steps listed in reports; the count goes on


def scale_value(scaler: Any) -> Tensor | float | None:
    """The scaler's current scale without a host read (None: no scaler, or disabled)."""
    if scaler is None or (hasattr(scaler, "is_enabled") and not scaler.is_enabled()):
        return None
    t = getattr(scaler, "_scale", None)
    if isinstance(t, Tensor):
        return t  # read on the device, never `.item()`
    return float(scaler.get_scale())  # a real GradScaler before its first scale(): the init scale, no sync


@dataclass
class ScaleTracker:
    min_scale: float
    max_consecutive_skips: int
    skips: int = 0
    consecutive: int = 0
    skip_steps: list[int] = field(default_factory=list)
    prev: tuple[int, float] | None = None  # (step, scale) of the last check read
    last_scale: float | None = None

    def _skipped(self, step: int) -> None:
        self.skips += 1
        self.consecutive += 1
        if len(self.skip_steps) < MAX_LISTED_SKIPS:
            self.skip_steps.append(step)

    def track(self, step: int, scale: float) -> str | None:
        """Record the scale read at `step`; 'scale_collapse' when it fell too low or skipped too often."""
        if self.prev is not None:
            if scale < self.prev[1]:  # GradScaler only lowers the scale when it skipped the step
                self._skipped(self.prev[0])
            else:
                self.consecutive = 0
        self.prev = (step, scale)
        self.last_scale = scale
        if not math.isfinite(scale) or scale < self.min_scale:
            return "scale_collapse"
        if self.consecutive >= self.max_consecutive_skips:
            return "scale_collapse"
        return None

    def final(self, scale: float) -> None:
        """At close: the last step's skip shows only in the scale after it."""
        if self.prev is not None and scale < self.prev[1]:
            self._skipped(self.prev[0])
        self.last_scale = scale
