"""One `check()` of the sentinel, and the small helpers its reading and dumping share."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor


@dataclass
class StepRecord:
    """One check: values arrive on the host now (CPU) or when `event` completes (CUDA)."""

    step: int
    names: tuple[str, ...]  # the device vector: loss terms, then "grad_norm" and "scale" when given
    n_fail: int  # the first n_fail device values are failures when non-finite (they freeze the snapshot)
    host: dict[str, float]  # values already on the host (python numbers)
    batch: Any
    forward: dict[str, Any] | None  # RNG/autocast/inputs captured at the first forward since the last check
    rng_at_check: dict[str, Any]
    slot: Tensor | None = None
    event: Any = None
    values: dict[str, float] | None = None
    checked: bool = True  # False: the step in progress when the block raised, check() never ran for it


@contextlib.contextmanager
def syncs_allowed() -> Iterator[None]:
    """Writing a dump copies to the host: switch a caller's CUDA sync debug mode off meanwhile, then restore it."""
    if not torch.cuda.is_available():
        yield
        return
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def finite(rec: StepRecord) -> bool:
    return all(math.isfinite(v) for v in (rec.values or {}).values())
