"""Peak memory of a block of tensor work (a loss and its backward), on CUDA or on the CPU.

CUDA: the caching allocator's own statistics: `torch.cuda.max_memory_allocated` after
`torch.cuda.reset_peak_memory_stats`, minus what was allocated on entry.

CPU: torch keeps no allocator statistics, so a `TorchDispatchMode` counts the bytes of every storage
an ATen op returns that none of its inputs owned (a fresh allocation: views and in-place results
are not counted twice) and uncounts it when that storage is freed (a weakref finalizer on the
storage, which torch keeps alive exactly as long as the storage). The peak is the maximum of that
running sum. The mode sees every op of the forward and of the backward (autograd runs a CPU backward
on the calling thread and carries the mode along); it does not see scratch buffers a kernel frees
before returning, nor allocator rounding, so it is a lower bound on what the allocator hands out,
measured the same way for every block compared.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CPU_METHOD = "live tensor storages created by ATen ops (TorchDispatchMode), peak of the running sum"
CUDA_METHOD = "torch.cuda.max_memory_allocated minus memory_allocated on entry"


class _StorageCounter(TorchDispatchMode):
    """Running sum of the bytes of storages created while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # data_ptr -> bytes
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        owned = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                 if isinstance(a, torch.Tensor) and a.device.type == "cpu"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in owned or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.current += self.live[key]
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


class PeakMemory:
    """`with PeakMemory(device) as mem: ...` then `mem.peak_bytes`; `mem.peak_so_far()` inside the block.

    On CUDA the process-wide peak statistics of `device` are reset on entry (torch cannot restore them).
    On the CPU the dispatch mode is removed on exit, also when the block raises.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.method = CUDA_METHOD if self.device.type == "cuda" else CPU_METHOD
        self.peak_bytes = 0
        self._base = 0
        self._counter: _StorageCounter | None = None

    def peak_so_far(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)) - self._base
        return self._counter.peak if self._counter is not None else self.peak_bytes

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = int(torch.cuda.memory_allocated(self.device))
        else:
            self._counter = _StorageCounter()
            self._counter.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = self.peak_so_far()
            return
        assert self._counter is not None
        self._counter.__exit__(*exc)
        self.peak_bytes = self._counter.peak
        self._counter = None
