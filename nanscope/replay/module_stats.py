"""Per-module activation magnitudes from one forward, for half-precision checks (NS303).

`module_stats(model)` is a context manager. Inside it, every call of every submodule folds, for
the floating-point tensors it returns (a tensor, or a tuple/list of them, one level of nesting),
the largest finite |value| and the number of NaN/inf values into running totals kept as 0-dim
tensors. On an accelerator nothing is copied to the host during the forward (no CUDA sync):
`ModuleStats.result()` stacks the totals and reads them once. On the CPU a finite output costs one
`aminmax` pass (about 0.1 of the forward on the demo model, benchmarks/inspect_overhead.py), cheap
enough to leave on for every `inspect`. Every hook is removed on exit, also when the forward raises.

Dict outputs (GroundingDINO's own `{"pred_logits", ...}`) are skipped: they hold the `-inf`
padding of `ContrastiveEmbed` by design, which is no overflow.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # ~3.39e38, the float32 range


@dataclass(frozen=True)
class ModuleStat:
    """What one module returned over all its calls in the forward."""

    name: str  # path as in `model.named_modules()` ('' is the model itself)
    kind: str  # class name, e.g. 'Linear'
    order: int  # completion order of its first call (an inner module completes before its parent)
    calls: int
    max_abs: float  # largest finite |value| of its outputs (0.0 when it returned no values)
    nonfinite: int  # NaN / +-inf output values, summed over calls
    dtype: str  # dtype of its last floating-point output, e.g. 'torch.float16'
    new_nonfinite: int = 0  # calls with non-finite outputs from finite inputs (counted with check_inputs=True)


class ModuleStats:
    """Running per-module totals; filled by the hooks of `module_stats`, read once by `result()`."""

    def __init__(self, *, check_inputs: bool = False) -> None:
        self.check_inputs = check_inputs
        self._max: dict[str, Tensor] = {}  # name -> 0-dim float32, on the output's device
        self._bad: dict[str, Tensor] = {}  # name -> 0-dim int64
        self._new: dict[str, Tensor] = {}  # name -> 0-dim int64 (only with check_inputs)
        self._meta: dict[str, list[Any]] = {}  # name -> [kind, order, calls, dtype]
        # id(output) -> (weak reference, version, max, bad): outputs handed on unchanged are reduced once
        self._seen: dict[int, tuple[weakref.ref[Tensor], int | None, Tensor, Tensor]] = {}

    def update(self, name: str, kind: str, inputs: Any, output: Any) -> None:
        tensors = _floats(output)
        if not tensors:
            return
        meta = self._meta.setdefault(name, [kind, len(self._meta), 0, ""])
        meta[2] += 1
        meta[3] = str(tensors[-1].dtype)
        call_bad: Tensor | None = None
        for t in tensors:
            biggest, bad = self._reduce(t)
            call_bad = bad if call_bad is None else call_bad + bad.to(call_bad.device)
            if name in self._max:
                self._max[name] = torch.maximum(self._max[name], biggest.to(self._max[name].device))
                self._bad[name] = self._bad[name] + bad.to(self._bad[name].device)
            else:
                self._max[name], self._bad[name] = biggest, bad
        if self.check_inputs and call_bad is not None:
            fresh = call_bad > 0
            for x in _floats(inputs):
                fresh = fresh & _all_finite(x.detach()).to(fresh.device)
            prev = self._new.get(name)
            self._new[name] = fresh.long() if prev is None else prev + fresh.long()

    def _reduce(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """`_max_and_bad(t)`, reused when `t` is the very tensor an inner module already returned
        (a container, Identity or an eval-mode Dropout hands its child's output on unchanged)."""
        key = id(t)
        seen = self._seen.get(key)
        version = t._version if not t.is_inference() else None
        if seen is not None and seen[0]() is t and seen[1] == version and version is not None:
            return seen[2], seen[3]
        biggest, bad = _max_and_bad(t.detach())
        self._seen[key] = (weakref.ref(t), version, biggest, bad)
        return biggest, bad

    def result(self) -> list[ModuleStat]:
        """All modules that returned floating-point tensors, in completion order (one host read)."""
        names = sorted(self._meta, key=lambda n: self._meta[n][1])
        if not names:
            return []
        dev = self._max[names[0]].device
        maxes = torch.stack([self._max[n].to(dev) for n in names]).cpu().tolist()
        bads = torch.stack([self._bad[n].to(dev) for n in names]).cpu().tolist()
        zero = torch.zeros((), dtype=torch.long, device=dev)
        news = torch.stack([self._new.get(n, zero).to(dev) for n in names]).cpu().tolist()
        return [ModuleStat(n, self._meta[n][0], self._meta[n][1], self._meta[n][2], float(m), int(b), self._meta[n][3],
                           int(k)) for n, m, b, k in zip(names, maxes, bads, news)]


def _max_and_bad(t: Tensor) -> tuple[Tensor, Tensor]:
    """(largest finite |value| as 0-dim float32, number of NaN/inf values as 0-dim int64) of `t`.

    On the CPU one `aminmax` pass (no temporary tensor) answers both when `t` is finite, which is
    nearly always; reading its two numbers costs nothing there. Only a non-finite `t` pays the masked
    reductions. On an accelerator the masked path runs always: no host read during the forward.
    """
    if t.device.type == "cpu":
        lo, hi = torch.aminmax(dense_flat(t))  # NaN propagates; +-inf shows as an end
        lo_f, hi_f = float(lo), float(hi)
        if math.isfinite(lo_f) and math.isfinite(hi_f):
            return torch.tensor(max(-lo_f, hi_f), dtype=torch.float32), torch.zeros((), dtype=torch.long)
    finite = torch.isfinite(t)
    a = t.abs()
    biggest = torch.where(finite, a, torch.zeros((), dtype=a.dtype, device=a.device)).amax().float()
    return biggest, finite.numel() - finite.sum()


def _all_finite(t: Tensor) -> Tensor:
    """0-dim bool: no NaN or inf in `t` (one aminmax pass on the CPU)."""
    if t.device.type == "cpu":
        lo, hi = torch.aminmax(dense_flat(t))
        return torch.tensor(math.isfinite(float(lo)) and math.isfinite(float(hi)))
    return torch.isfinite(t).all()


def dense_flat(t: Tensor) -> Tensor:
    """A 1-D view of the same elements when `t` is dense in memory (permuted, channels-last ...); else `t`
    (contiguous tensors reduce at full speed as they are).

    A reduction over a permuted tensor runs about 2x slower on the CPU; the set of values is all we need.
    """
    if t.is_contiguous():
        return t
    expected = 1
    for stride, size in sorted(zip(t.stride(), t.shape)):
        if size == 1:
            continue
        if stride != expected:
            return t
        expected *= size
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _floats(x: Any) -> list[Tensor]:
    return [t for t in _tensors(x) if t.is_floating_point() and t.numel() > 0]


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        out: list[Tensor] = []
        for x in output:
            if isinstance(x, Tensor):
                out.append(x)
            elif isinstance(x, (tuple, list)):
                out.extend(y for y in x if isinstance(y, Tensor))
        return out
    return []


@contextlib.contextmanager
def module_stats(model: nn.Module, *, check_inputs: bool = False) -> Iterator[ModuleStats]:
    """Hook every submodule of `model` (itself included) for the duration of the block.

    check_inputs: also count calls whose outputs are non-finite while their tensor inputs are finite
    (where an overflow starts rather than where it spreads); costs one more pass over the inputs.
    """
    stats = ModuleStats(check_inputs=check_inputs)
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def hook_for(name: str, kind: str) -> Any:
        def hook(_m: nn.Module, args: Any, output: Any) -> None:
            with torch.no_grad():
                stats.update(name, kind, args, output)
        return hook

    try:
        for name, m in model.named_modules():
            handles.append(m.register_forward_hook(hook_for(name, type(m).__name__)))
        yield stats
    finally:
        for h in handles:
            h.remove()


def half_limit(dtype: torch.dtype | None, factor: float) -> float:
    """The |activation| above which `dtype` (fp16 when None: the common AMP choice) is at risk.

    `factor` is the safety margin: the largest representable value divided by it.
    """
    top = BF16_MAX if dtype == torch.bfloat16 else FP16_MAX
    return top / factor
