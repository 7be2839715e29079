"""Flush denormal floats to zero for a block of CPU work, and put the previous mode back afterwards.

verify-fix's training steps (check 8) slow down step by step on CPU as the backward fills with
denormal (subnormal) float32 values, below 1.2e-38, which x86 handles in microcode: `flush_denormals`
runs them at their normal speed. Flushing changes a value only where it is below 1.2e-38 in magnitude,
far under float32's resolution of any loss term (relative 6e-8), so the losses agree with the
unflushed run to rounding. torch has a setter (`torch.set_flush_denormal`) but no getter, so the
previous mode is read by multiplying a denormal by 1.0 (`flushing`). Restored also on exceptions.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

SMALLEST_NORMAL = 1.1754943508222875e-38  # float32: values below this in magnitude are denormal


def flushing() -> bool:
    """Whether this thread flushes denormals now (a denormal times 1.0 comes out 0)."""
    x = torch.full((4,), SMALLEST_NORMAL / 4, dtype=torch.float32)
    return bool((x * 1.0 == 0).all())


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Flush denormals inside (when `enabled` and the CPU supports it); yields whether it flushes."""
    if not enabled:
        yield flushing()
        return
    before = flushing()
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(before)
