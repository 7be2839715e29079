"""The two-phase origin trace: module-level flags in the one real run, then op-level replays of single calls.

Phase 1 runs `run()` and its backward once with `CallFlags` (one reduction per module output and per gradient at
a module output) and `LossOps` (the op-level mode on the loss code only, lifted inside module calls). The
backward runs at module level with the graph kept; where the loss, or a gradient the loss code sent back, is not
finite, the loss code's backward runs again alone under `LossOps` (a few ops: the model's part is not re-run).
Phase 2 replays, under the op-level mode, the first call that returned NaN and the innermost calls that made
inf (`replay_calls`), and, for a gradient that went non-finite inside the model, the backward of the call that
made it (`_backward`). Where they cannot answer, `two_phase` returns None and why; the caller then traces the
whole step op by op.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from nanscope.trace._backward import model_backward
from nanscope.trace._calls import Call, CallFlags, GradientNaN
from nanscope.trace._loss import PRUNE, LossOps, swap_inf_from, total_loss
from nanscope.trace._replay import Replayed, replay_calls
from nanscope.trace.records import Origin, TraceResult

_MAX_REPLAYS = 64  # module calls that made inf, replayed one by one before the whole step is traced instead


def two_phase(model: nn.Module, run: Callable[[], Any], backward: bool) -> tuple[TraceResult | None, str, int]:
    """(the result, "", calls) or (None, why the whole step must be traced op by op, calls)."""
    flags = CallFlags(model, grads=backward)
    loss = LossOps(model, flags)
    sent: list[int] = []
    params: list[tuple[torch.Tensor, int]] = []
    try:
        with torch.enable_grad():
            with loss.modules, loss, flags:  # flags exits first: it may have to put the mode back
                out = run()
                with loss.paused():
                    total = total_loss(out)
                    loss_rec = flags.reduce(total)
            trainable = [p for p in model.parameters() if p.requires_grad]
            backward_traced = backward and total.requires_grad and bool(trainable)
            if backward_traced:
                # The whole backward at module level (stopped at the first NaN gradient on the CPU: the rest carries
                # it), the graph kept; then, where the loss or what it sent back is not finite, the loss code's
                # backward alone under the op-level mode.
                flags.stop_at_nan = True
                try:
                    grads = torch.autograd.grad(total, trainable, grad_outputs=torch.ones_like(total),
                                                retain_graph=True, allow_unused=True)
                    params = [(p, flags.reduce(g)) for p, g in zip(trainable, grads) if g is not None]
                except GradientNaN:
                    pass
                finally:
                    flags.stop_at_nan = False
                flags.flush()
                sent = [rec for call, i, rec in flags.grad_order if call.outs[i] in loss.read_recs]
                sent += [rec for p, rec in params if id(p) in loss.read_ids]
                loss.flush()
                if (flags.nan[loss_rec] or flags.inf[loss_rec] or flags.any_nan(sent) or flags.any_inf(sent)
                        or loss.ledger.origins):
                    loss.loss_backward(total)
            del total, out
        flags.flush()
        loss.flush()
        return _answer(model, flags, loss, loss_rec, sent, params, backward_traced)
    finally:
        flags.close()


def _answer(model: nn.Module, flags: CallFlags, loss: LossOps, loss_rec: int, sent: list[int],
            params: list[tuple[torch.Tensor, int]], backward_traced: bool) -> tuple[TraceResult | None, str, int]:
    n = len(flags.calls)
    loss_nan, loss_inf = flags.nan[loss_rec], flags.inf[loss_rec]
    done = sorted((c for c in flags.calls if c.end >= 0), key=lambda c: c.end)
    targets = []
    nan_calls = [c for c in done if flags.any_nan(c.outs)]
    if nan_calls:
        first = nan_calls[0]  # completion order: the innermost call that returned NaN first
        if first.moved:
            return None, f"{_name(first.name)} changed one of its inputs in place: its call cannot be replayed", n
        if flags.any_nan(first.ins):
            return None, f"NaN entered {_name(first.name)} through an input that no module returned", n
        targets.append(first)
    for c in done:
        if any(flags.inf[r] and not flags.tracked[r] for r in c.ins):
            return None, f"inf entered {_name(c.name)} through an input that no module returned", n
    made_inf = [c for c in done if flags.any_inf(c.outs) and not flags.any_inf(c.ins)]
    inner = [c for c in made_inf if not any(d.seq > c.seq and d.end < c.end for d in made_inf)]
    if len(inner) > _MAX_REPLAYS:
        return None, f"{len(inner)} module calls made inf (more than {_MAX_REPLAYS} to replay)", n
    targets = sorted({id(c): c for c in targets + inner}.values(), key=lambda c: c.seq)
    for c in targets:
        if not flags.replayable(c):
            return None, f"{_name(c.name)} changed one of its inputs in place: its call cannot be replayed", n
    replayed = replay_calls(model, targets)
    ledger = replayed.mode.ledger
    if nan_calls and ("forward", "nan") not in ledger.origins:
        return None, f"the replay of {_name(nan_calls[0].name)} did not make the NaN again", n
    if inner and not ledger.inf_sources:
        return None, f"the replay of {_name(inner[0].name)} did not make the inf again", n
    if any(o.source is not None and o.source.startswith("tensor ") for o in ledger.origins.values()):
        return None, "a replayed call read a non-finite input that no module returned", n

    # The loss code: traced op by op in phase 1; the inf it read from the model gets its writer from the replays.
    placeholders = loss.placeholders()
    loss_sources = [s for s in loss.ledger.inf_sources if id(s) not in placeholders]
    found = loss.resolve_inf_from(_source_of(flags, replayed))
    loss_forward = swap_inf_from([o for o in loss.ledger.origins.values() if o.phase == "forward"], found)
    if any(loss.ledger.nan[r] or loss.ledger.inf[r] is not False for r in loss.foreign):
        return None, "the loss code read a non-finite tensor that the run made but no module returned", n
    if any(o.inf_from is not None and id(o.inf_from) in placeholders for o in loss_forward):
        return None, "the loss code made NaN from inf the model returned, and no replayed call wrote it", n
    if loss_nan and not nan_calls and not any(o.kind == "nan" for o in loss_forward):
        return None, "the loss is NaN while neither a module nor the loss code made NaN", n
    if loss_inf and not inner and not loss_sources:
        return None, "the loss is inf while neither a module nor the loss code made inf", n

    # Forward origins of both, in the order they ran: a loss-code op `i` ran before a call that started when
    # the loss code had run `tick` ops exactly when i < tick.
    keyed = [((replayed.call_of(o.index).tick, 0, o.index), o) for o in ledger.origins.values()
             if o.phase == "forward"] + [((o.index, 1, 0), o) for o in loss_forward]
    forward: dict[str, Origin] = {}
    for _, o in sorted(keyed, key=lambda k: k[0]):
        forward.setdefault(o.kind, o)
    sources = [((replayed.call_of(s.index).tick, 0, s.index), s) for s in ledger.inf_sources] + \
              [((s.index, 1, 0), s) for s in loss_sources]
    intentional = tuple(s for _, s in sorted(sources, key=lambda k: k[0]) if s.intentional and s.phase == "forward")

    # The backward: the loss code's own origins, then, for what it did not send into the model, the model's.
    back = sorted((o for o in loss.ledger.origins.values() if o.phase == "backward"), key=lambda o: o.index)
    ops = replayed.mode.ops_seen + loss.ops_seen
    back_calls: list[Call] = []
    if backward_traced:
        carried = {"nan", "inf"} if flags.any_nan(sent) else {"inf"} if flags.any_inf(sent) else set()
        model_back = model_backward(model, flags, params, skip=carried | {o.kind for o in back})
        if isinstance(model_back, str):
            return None, model_back, n
        back += model_back.origins
        back_calls, ops = model_back.calls, ops + model_back.ops_seen
    origins = tuple(sorted(forward.values(), key=lambda o: next(k for k, x in keyed if x is o))) + tuple(back)
    return TraceResult(
        forward=next((o for o in origins if o.phase == "forward"), None),
        backward=back[0] if back else None,
        loss_finite=not (loss_nan or loss_inf),
        ops_seen=ops,
        origins=origins,
        intentional_inf_sources=intentional,
        backward_traced=backward_traced,
        module_calls=n,
        replayed=tuple(c.name for c in targets),
        replayed_backward=tuple(c.name for c in back_calls),
    ), "", n


def _source_of(flags: CallFlags, replayed: Replayed) -> Callable[[Any], object]:
    """For the autograd walk from a model output the loss code read: at a node that made a module's output, the
    inf source of that output in the replays, PRUNE where the output held no inf, else None (walk on)."""
    at: dict[Any, list[tuple[Call, int]]] = {}
    for call in flags.calls:
        for i, node in enumerate(call.nodes):
            if node is not None:
                at.setdefault(node, []).append((call, i))
    ledger = replayed.mode.ledger

    def source_of(node: Any) -> object:
        hits = at.get(node)
        if not hits:
            return None
        for call, i in hits:
            recs = replayed.outs.get(call.seq)
            source = ledger.written_by(recs[i]) if recs is not None and i < len(recs) and recs[i] >= 0 else None
            if source is not None:
                return source
        if not any(flags.inf[call.outs[i]] or flags.nan[call.outs[i]] for call, i in hits):
            return PRUNE
        return None

    return source_of


def _name(path: str) -> str:
    return path or "the root module"

