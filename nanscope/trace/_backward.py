"""The model's backward in two phases: which module call's backward made the first non-finite gradient.

Phase 1 (`CallFlags`) saw, in the order they arrived, the gradients at every module output and then the
parameter gradients. The first one holding NaN (or inf) names a tensor `x`, the output of call `p`; the op that
made it ran in the backward of something that read `x`: a call `x` was passed to (innermost and most recently
reached by the backward first), or the inline code of a call `p` ran inside (innermost first). Those candidates
are replayed one at a time (`replay_backward`: forward from the saved inputs, backward from the saved gradients
at its outputs) until one makes the NaN (or inf) again; its ledger names the op, the module and the forward line
as the op-level trace of the whole step does. For a parameter gradient, the candidates are the calls of the
module that owns it, the latest first (the backward reaches it first).

A gradient that arrives non-finite from the loss code is carried, not made, in the model: the caller skips
that kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nanscope.trace._calls import Call, CallFlags
from nanscope.trace._mode import NonfiniteMode
from nanscope.trace._replay import replay_backward
from nanscope.trace.records import Origin

_MAX_REPLAYS = 4  # backward replays tried per kind before the whole step is traced op by op


@dataclass
class ModelBackward:
    origins: list[Origin]  # in the order the backward made them
    calls: list[Call]  # the calls whose replayed backward named them, in the same order
    ops_seen: int


def model_backward(root: nn.Module, flags: CallFlags, params: list[tuple[torch.Tensor, int]], *,
                   skip: set[str]) -> ModelBackward | str:
    """The first NaN and the first inf made in the model's backward (kinds in `skip` are carried in from the loss
    code or named there), or why the whole step must be traced op by op. A kind that never reached a module output
    (inf turned into NaN inside the call that made it) is taken from the replay that named the other."""
    cache: dict[int, tuple[NonfiniteMode, set[str]]] = {}
    found: list[tuple[tuple[int, int], Origin, Call]] = []  # ((where it first showed, op index), origin, call)
    answered = set(skip)
    ops = 0
    for kind in ("nan", "inf"):
        first = None if kind in skip else first_nonfinite(flags, kind, params)
        if first is None:
            continue
        answer = model_backward_origin(root, flags, kind, first[1], cache)
        ops += answer.ops_seen
        if answer.call is None:
            return answer.failed
        answered.add(kind)
        if answer.origin is not None:
            found.append(((first[0], answer.origin.index), answer.origin, answer.call))
    for kind in ("nan", "inf"):
        if kind in answered:
            continue
        for key, _, call in list(found):
            other = cache[call.seq][0].ledger.origins.get(("backward", kind))
            if other is not None:
                found.append(((key[0], other.index), other, call))
                break
    found.sort(key=lambda f: f[0])
    calls: list[Call] = []
    for _, _, call in found:
        if call not in calls:
            calls.append(call)
    return ModelBackward([o for _, o, _ in found], calls, ops)


@dataclass
class BackwardAnswer:
    origin: Origin | None  # None: nothing of this kind started in the model's backward (carried, or `failed`)
    call: Call | None = None  # the call whose backward made or carried it
    ops_seen: int = 0
    failed: str = ""  # why the candidates could not answer (the caller traces the whole step)


def first_nonfinite(flags: CallFlags, kind: str, params: list[tuple[torch.Tensor, int]]
                    ) -> tuple[int, tuple[Call, int] | torch.Tensor] | None:
    """The first gradient holding `kind` and its position in arrival order: (call, output index) at a module
    output, or the parameter (parameter gradients count as arriving after every module output's)."""
    flag = flags.nan if kind == "nan" else flags.inf
    for position, (call, index, rec) in enumerate(flags.grad_order):
        if flag[rec]:
            return position, (call, index)
    return next(((len(flags.grad_order) + i, p) for i, (p, rec) in enumerate(params) if flag[rec]), None)


def model_backward_origin(root: nn.Module, flags: CallFlags, kind: str, first: tuple[Call, int] | torch.Tensor,
                          cache: dict[int, tuple[NonfiniteMode, set[str]]]) -> BackwardAnswer:
    """Replay candidate calls' backward until one makes `kind` again (`cache`: replays by call.seq).

    A candidate whose forward already returned NaN, or whose replayed backward makes `kind` with no op making it
    from finite inputs, carries it from non-finite forward values (saved tensors, parameters): no origin."""
    tried, ops = 0, 0
    for call in _candidates(root, flags, first):
        if not _usable(flags, call, kind):
            continue
        if flags.any_nan(call.outs):
            return BackwardAnswer(None, call, ops)
        if tried == _MAX_REPLAYS:
            break
        tried += 1
        if call.seq not in cache:
            cache[call.seq] = replay_backward(root, call)
            ops += cache[call.seq][0].ops_seen
        mode, made = cache[call.seq]
        origin = mode.ledger.origins.get(("backward", kind))
        if origin is not None or kind in made:
            return BackwardAnswer(origin, call, ops)
    where = (f"the output of {first[0].name or 'the root module'}" if isinstance(first, tuple)
             else "a parameter")
    what = "NaN" if kind == "nan" else "inf"
    return BackwardAnswer(None, None, ops, failed=(
        f"the gradient at {where} went {what} in the backward and the replay of {tried} module call(s) that "
        f"read it did not make it again" if tried else
        f"the gradient at {where} went {what} in the backward and no call that read it can be replayed"))


def _candidates(root: nn.Module, flags: CallFlags, first: tuple[Call, int] | torch.Tensor) -> list[Call]:
    if not isinstance(first, tuple):
        owners = {id(m) for m in root.modules() if any(p is first for p in m.parameters(recurse=False))}
        return sorted((c for c in flags.calls if id(c.module) in owners), key=lambda c: -c.seq)
    p, index = first
    rec = p.outs[index]
    readers = [d for d in flags.calls if d.seq > p.seq and rec in d.ins and not _within(d, p)]
    readers.sort(key=lambda d: (-d.fired, -d.seq))
    ancestors, a = [], p.parent
    while a is not None:
        ancestors.append(a)
        a = a.parent
    unique: dict[int, Call] = {}
    for c in readers + ancestors:
        unique.setdefault(c.seq, c)
    return list(unique.values())


def _within(d: Call, p: Call) -> bool:
    a = d.parent
    while a is not None:
        if a is p:
            return True
        a = a.parent
    return False


def _usable(flags: CallFlags, call: Call, kind: str) -> bool:
    """Inputs kept and unchanged, gradients held at its outputs, and those did not already hold `kind`."""
    if not call.gouts or not flags.replayable(call) or any(g is None for _, g in call.gouts.values()):
        return False
    recs = [r for r, _ in call.gouts.values()]
    return not (flags.any_nan(recs) or (kind == "inf" and flags.any_inf(recs)))
