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
from typing import Any, Union

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
        # name -> largest finite |value|, NaN/inf count, calls that started non-finite values (check_inputs):
        # Python numbers on the CPU, 0-dim tensors on the output's device elsewhere
        self._max: dict[str, Number] = {}
        self._bad: dict[str, Number] = {}
        self._new: dict[str, Number] = {}
        self._meta: dict[str, list[Any]] = {}  # name -> [kind, order, calls, dtype]
        # id(output) -> (weak reference, version, max, bad): outputs handed on unchanged are reduced once
        self._seen: dict[int, tuple[weakref.ref[Tensor], int | None, Number, Number]] = {}

    def update(self, name: str, kind: str, inputs: Any, output: Any) -> None:
        tensors = _floats(output)
        if not tensors:
            return
        meta = self._meta.setdefault(name, [kind, len(self._meta), 0, ""])
        meta[2] += 1
        meta[3] = str(tensors[-1].dtype)
        call_bad: Number | None = None
        for t in tensors:
            biggest, bad = self._reduce(t)
            call_bad = bad if call_bad is None else call_bad + _on(bad, call_bad)
            if name in self._max:
                prev = self._max[name]
                both_numbers = not isinstance(prev, Tensor) and not isinstance(biggest, Tensor)
                self._max[name] = (max(prev, biggest) if both_numbers  # type: ignore[type-var]
                                   else torch.maximum(_t(prev), _t(biggest).to(_t(prev).device)))
                self._bad[name] = self._bad[name] + _on(bad, self._bad[name])
            else:
                self._max[name], self._bad[name] = biggest, bad
        if self.check_inputs and call_bad is not None:
            fresh: Number = call_bad > 0
            for x in _floats(inputs):
                ok = _all_finite(x.detach())
                fresh = (fresh and ok) if not isinstance(fresh, Tensor) and not isinstance(ok, Tensor) \
                    else _t(fresh) & _t(ok).to(_t(fresh).device)
            prev_new = self._new.get(name, 0)
            self._new[name] = prev_new + (int(fresh) if not isinstance(fresh, Tensor) else _on(fresh.long(), prev_new))

    def _reduce(self, t: Tensor) -> tuple[Number, Number]:
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
        maxes, bads, news = (_read([d.get(n, 0) for n in names]) for d in (self._max, self._bad, self._new))
        return [ModuleStat(n, self._meta[n][0], self._meta[n][1], self._meta[n][2], float(m), int(b), self._meta[n][3],
                           int(k)) for n, m, b, k in zip(names, maxes, bads, news)]


Number = Union[float, int, bool, Tensor]  # a Python number on the CPU, a 0-dim tensor on an accelerator


def _t(x: Number) -> Tensor:
    return x if isinstance(x, Tensor) else torch.tensor(x)


def _on(x: Number, like: Number) -> Number:
    """`x` where it can be added to `like` (a tensor moves to `like`'s device)."""
    if isinstance(x, Tensor) and isinstance(like, Tensor):
        return x.to(like.device)
    return x


def _read(values: list[Number]) -> list[float]:
    """Python numbers as they are; the device tensors among them in one host read per device."""
    out = [float(v) if not isinstance(v, Tensor) else 0.0 for v in values]
    by_dev: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, Tensor):
            by_dev.setdefault(v.device, []).append(i)
    for idx in by_dev.values():
        stacked = torch.stack([values[i].float() for i in idx])  # type: ignore[union-attr]
        for i, x in zip(idx, stacked.cpu().tolist()):
            out[i] = x
    return out


def _max_and_bad(t: Tensor) -> tuple[Number, Number]:
    """(largest finite |value|, number of NaN/inf values) of `t`: Python numbers on the CPU, 0-dim float32 and
    int64 tensors on an accelerator (no host read during the forward).

    On the CPU one `aminmax` pass (no temporary tensor) answers both when `t` is finite, which is nearly
    always, and nothing is allocated: small tensors kept for the whole forward between the large activations
    fragment the heap and raised inspect's peak memory at full size. A non-finite `t` is read in chunks of
    `_CHUNK` values, so its masked copies stay small.
    """
    if t.device.type == "cpu":
        lo, hi = torch.aminmax(dense_flat(t))  # NaN propagates; +-inf shows as an end
        lo_f, hi_f = float(lo), float(hi)
        if math.isfinite(lo_f) and math.isfinite(hi_f):
            return max(-lo_f, hi_f), 0
        biggest, bad = 0.0, 0
        for part in dense_flat(t).reshape(-1).split(_CHUNK):
            finite = torch.isfinite(part)
            n_finite = int(finite.sum())
            bad += part.numel() - n_finite
            if n_finite:
                biggest = max(biggest, float(torch.where(finite, part.abs(), 0).amax()))
        return biggest, bad
    finite = torch.isfinite(t)
    a = t.abs()
    biggest_t = torch.where(finite, a, torch.zeros((), dtype=a.dtype, device=a.device)).amax().float()
    return biggest_t, finite.numel() - finite.sum()


_CHUNK = 1 << 20  # values per chunk of a non-finite CPU tensor


def _all_finite(t: Tensor) -> Number:
    """No NaN or inf in `t`: a bool on the CPU (one aminmax pass), a 0-dim bool tensor elsewhere."""
    if t.device.type == "cpu":
        lo, hi = torch.aminmax(dense_flat(t))
        return math.isfinite(float(lo)) and math.isfinite(float(hi))
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
