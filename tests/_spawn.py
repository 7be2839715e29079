"""Start `nprocs` ranks with torch.multiprocessing and fail the test (killing them) when they hang."""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest
import torch.multiprocessing as mp


def spawn_or_fail(worker: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout_s: float) -> None:
    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks did not finish within {timeout_s} s (a hang)")
    assert [p.exitcode for p in ctx.processes] == [0] * nprocs
