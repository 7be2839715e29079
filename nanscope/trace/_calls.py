"""Phase 1 of the origin trace: one finiteness reduction per module output and per gradient, no op-level work.

`CallFlags(root)` is a context manager. While it is on, global forward hooks note every call of a module of
`root`: the user line that made it, one `aminmax` per floating output (NaN propagates through min/max, so
one reduction tells NaN, inf and finite apart) and, from a cache keyed by tensor identity and version, the
same flags for its inputs (an input another module returned costs nothing; anything else one reduction).
The reductions stay on their device: on an accelerator they are read in batches of `_FLUSH_CALLS` calls
(one device->host copy per batch and dtype), on the CPU at once (reading a CPU scalar is no sync).

For the backward, a tensor hook on each floating output that requires grad reduces the gradient that
arrives there (in `grad_order`, the order they arrive), and `reduce` takes the parameter gradients: a
gradient that goes non-finite anywhere between two module outputs shows up at the next one. Tensor hooks
rather than full backward hooks: those wrap every module's inputs and outputs in a custom autograd
Function, which changes the forward (in-place ops on a module's output raise) and costs more.

Calls whose output went non-finite keep references to their inputs (args, kwargs, the CPU and CUDA
generator states when the module trains, the inputs' version counters) for `nanscope.trace._replay`; so do
calls with an output that requires grad, until the backward has been read, with the most recent
`_HOLD_BYTES` of the gradients that arrived at their outputs: the replay of one call's backward needs
both. `close()` drops them all.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _pop_mode, _push_mode
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_mode
from torch.utils._pytree import tree_leaves

from nanscope.errors import Interrupt
from nanscope.replay.module_stats import dense_flat
from nanscope.trace._frames import FrameKey, user_frame

_FLUSH_CALLS = 512  # accelerator: module calls between two reads of the queued flags (one sync each)
_HOLD_BYTES = 256 * 2**20  # gradients at module outputs kept for a backward replay; the most recent ones


@dataclass(slots=True)
class Call:
    """One call of one module, in the order calls started (`seq`) and completed (`end`)."""

    seq: int
    name: str
    module: nn.Module
    frame: FrameKey | None  # the user line that called it
    end: int = -1
    ins: tuple[int, ...] = ()  # flag records of its floating inputs
    outs: tuple[int, ...] = ()  # flag records of its floating outputs
    args: tuple[Any, ...] | None = None  # kept only while it may be replayed
    kwargs: dict[str, Any] | None = None
    versions: tuple[tuple[torch.Tensor, int], ...] = ()
    rng: tuple[torch.Tensor, ...] | None = None  # generator states before the call (training modules only)
    arg_versions: tuple[int | None, ...] = field(default=())
    moved: bool = False  # it changed one of its inputs in place: input flags read after the fact, no replay
    parent: "Call | None" = None  # the call it ran inside
    tick: int = 0  # loss-code ops seen before it started (orders module calls against the loss code's ops)
    nodes: tuple[Any, ...] = ()  # the autograd nodes of its floating outputs (None where no grad)
    grad_out: bool = False  # an output requires grad: inputs kept for the replay of its backward
    gouts: dict[int, tuple[int, torch.Tensor | None]] = field(default_factory=dict)  # output index -> gradient
    fired: int = -1  # order of the last gradient that arrived at one of its outputs


class CallFlags:
    """Module-level finiteness flags of one forward (+ backward). Enter before `run()`; `flush()` reads them."""

    def __init__(self, root: nn.Module, *, grads: bool = True) -> None:
        self._names = {id(m): n for n, m in root.named_modules()}
        self._grads = grads
        self.calls: list[Call] = []
        self._open: list[Call] = []
        self.nan: list[bool] = []
        self.inf: list[bool] = []
        self.tracked: list[bool] = []  # a module of root returned it
        # gradients at module outputs, in the order they arrived: (call, output index, flag record)
        self.grad_order: list[tuple[Call, int, int]] = []
        self._known: dict[int, tuple[weakref.ref[torch.Tensor], int | None, int]] = {}
        self._queue: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[torch.Tensor]]] = {}
        self._unread: list[Call] = []
        self._grads_seen: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._held: deque[tuple[Call, int, int]] = deque()  # gradients kept for a backward replay, oldest first
        self._held_bytes = 0
        self._frames: dict[Any, bool] = {}
        self._handles: list[Any] = []
        self._closed = False
        self.grads_paused = False  # the loss code's own backward (`nanscope.trace._loss`) runs: hooks do nothing
        self.stop_at_nan = False  # raise `GradientNaN` from the first NaN gradient whose flags are read at once
        self._ends = 0
        self.busy = False  # inside our own bookkeeping: the loss-code mode lets its ops through
        # the loss-code mode (`nanscope.trace._loss.LossOps`): taken off the mode stack inside module calls
        self.outside: Any = None
        self._lifted = False

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "CallFlags":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [register_module_forward_pre_hook(self._pre),
                         register_module_forward_hook(self._post, with_kwargs=True, always_call=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._open.clear()
        if self._lifted:  # a BaseException left a module call: put the mode back for its own exit
            _push_mode(self.outside)
            self._lifted = False

    def close(self) -> None:
        """Gradient hooks left on tensors the caller still holds do nothing from now on; held inputs and
        gradients are dropped."""
        self._closed = True
        self._held.clear()
        for call in self.calls:
            call.args = call.kwargs = call.rng = None
            call.versions = call.nodes = ()
            call.gouts = {}

    # ------------------------------------------------------------------ hooks
    def _pre(self, mod: nn.Module, args: Any) -> None:
        name = self._names.get(id(mod))
        if name is None:
            return
        call = Call(seq=len(self.calls), name=name, module=mod, frame=user_frame(self._frames, depth=2),
                    parent=self._open[-1] if self._open else None,
                    tick=self.outside.ops_seen if self.outside is not None else 0)
        call.arg_versions = tuple(_version(a) if isinstance(a, torch.Tensor) else None for a in args)
        if mod.training:
            call.rng = rng_states()
        if not self._open and self.outside is not None and _current_mode() is self.outside:
            _pop_mode()  # the model's own ops run without any Python dispatch; CallFlags covers them
            self._lifted = True
        self.calls.append(call)
        self._open.append(call)

    def _post(self, mod: nn.Module, args: Any, *rest: Any) -> None:
        if id(mod) not in self._names or not self._open or self._open[-1].module is not mod:
            return
        call = self._open.pop()
        if not self._open and self._lifted:
            _push_mode(self.outside)
            self._lifted = False
        if len(rest) != 2:  # torch calls an always_call hook as (module, args, result) when the forward raised
            return
        kwargs, out = rest
        call.end = self._ends
        self._ends += 1
        busy, self.busy = self.busy, True
        try:
            with torch.no_grad():
                call.ins = tuple(self._flags(t, tracked=False) for t in _floats((args, kwargs)))
                outs = _floats(out)
                call.outs = tuple(self._flags(t, tracked=True) for t in outs)
        finally:
            self.busy = busy
        if self._grads and torch.is_grad_enabled():
            call.nodes = tuple(t.grad_fn for t in outs)
            for i, t in enumerate(outs):
                if t.requires_grad:
                    call.grad_out = True
                    t.register_hook(partial(self._grad_hook, call, i))
        call.moved = any(isinstance(a, torch.Tensor) and v is not None and _version(a) != v
                         for a, v in zip(args, call.arg_versions))
        if not call.moved:  # an input the module changed in place cannot be replayed
            call.args, call.kwargs = tuple(args), dict(kwargs)
            call.versions = tuple((t, v) for t in tree_leaves((args, kwargs))
                                  if isinstance(t, torch.Tensor) and (v := _version(t)) is not None)
        self._unread.append(call)
        if not self._queue:
            self._release()
        elif len(self._unread) >= _FLUSH_CALLS:
            self.flush()

    def _grad_hook(self, call: Call, index: int, grad: torch.Tensor) -> None:
        if self._closed or self.grads_paused or not grad.is_floating_point() or not grad.numel():
            return
        seen = self._grads_seen.get(id(grad))
        if seen is not None and seen[0]() is grad:
            rec = seen[1]  # the same gradient at an output several nested calls returned: reduced once
        else:
            rec = self.reduce(grad)
            self._grads_seen[id(grad)] = (weakref.ref(grad), rec)
        call.fired = len(self.grad_order)
        self.grad_order.append((call, index, rec))
        call.gouts[index] = (rec, grad)
        size = grad.numel() * grad.element_size()
        self._held.append((call, index, size))
        self._held_bytes += size
        while self._held_bytes > _HOLD_BYTES and len(self._held) > 1:  # the most recent ones are the ones needed
            old, i, n = self._held.popleft()
            self._held_bytes -= n
            if i in old.gouts:
                old.gouts[i] = (old.gouts[i][0], None)
        if self.stop_at_nan and grad.device.type == "cpu" and self.nan[rec]:
            raise GradientNaN()

    # ------------------------------------------------------------------ flags
    def reduce(self, t: torch.Tensor) -> int:
        """A flag record for `t` (the loss, a parameter gradient)."""
        busy, self.busy = self.busy, True
        try:
            with torch.no_grad():
                return self._reduce(t.detach())
        finally:
            self.busy = busy

    def returned(self, t: torch.Tensor) -> int | None:
        """The flag record of `t` when a module of root returned it (unchanged since), else None."""
        known = self._known.get(id(t))
        if known is None or known[0]() is not t or known[1] != _version(t) or not self.tracked[known[2]]:
            return None
        return known[2]

    def _flags(self, t: torch.Tensor, *, tracked: bool) -> int:
        known = self._known.get(id(t))
        version = _version(t)
        if known is not None and known[0]() is t and known[1] == version and version is not None:
            rec = known[2]
            if tracked:
                self.tracked[rec] = True
            return rec
        rec = self._reduce(t.detach(), tracked=tracked)
        self._known[id(t)] = (weakref.ref(t), version, rec)
        return rec

    def _reduce(self, t: torch.Tensor, *, tracked: bool = False) -> int:
        rec = len(self.nan)
        self.nan.append(False)
        self.inf.append(False)
        self.tracked.append(tracked)
        if not t.numel():
            return rec
        mn, mx = torch.aminmax(dense_flat(t))
        if t.device.type == "cpu":
            self._set(rec, float(mn), float(mx))
        else:
            recs, vals = self._queue.setdefault((t.device, t.dtype), ([], []))
            recs.append(rec)
            vals.append(torch.stack([mn, mx]))
        return rec

    def _set(self, rec: int, mn: float, mx: float) -> None:
        nan = mn != mn or mx != mx
        self.nan[rec] = nan
        self.inf[rec] = not nan and (abs(mn) == float("inf") or abs(mx) == float("inf"))

    def flush(self) -> None:
        """Read the queued flags (one device->host copy per device and dtype); drop clean calls' inputs."""
        for recs, vals in self._queue.values():
            for rec, (mn, mx) in zip(recs, torch.stack(vals).float().cpu().tolist()):
                self._set(rec, mn, mx)
        self._queue = {}
        self._release()

    def _release(self) -> None:
        for call in self._unread:
            # A call with a clean output keeps its inputs only while its backward may have to be replayed.
            if not call.grad_out and not any(self.nan[r] or self.inf[r] for r in call.outs):
                call.args = call.kwargs = call.rng = None
                call.versions = ()
        self._unread = []

    # ------------------------------------------------------------------ answers
    def any_nan(self, recs: tuple[int, ...] | list[int]) -> bool:
        return any(self.nan[r] for r in recs)

    def any_inf(self, recs: tuple[int, ...] | list[int]) -> bool:
        return any(self.inf[r] for r in recs)

    def replayable(self, call: Call) -> bool:
        """Its inputs are kept and none changed in place since the call."""
        return call.args is not None and all(_version(t) == v for t, v in call.versions)


class GradientNaN(Interrupt):
    """Raised through the backward from the first gradient at a module output that holds NaN (`stop_at_nan`): from
    there on NaN flows everywhere and the rest of the backward names nothing new. A BaseException, so that no
    `except Exception` in a hook of the user's swallows it."""


def rng_states() -> tuple[torch.Tensor, ...]:
    states = [torch.random.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    return tuple(states)


def set_rng_states(states: tuple[torch.Tensor, ...]) -> None:
    torch.random.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state(states[1])


def _floats(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0]


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None
