"""The first non-finite operation, in the forward and in the backward (findings NS301, NS302).

`trace_nonfinite(model, run)` replays `run()` (forward + loss) and the backward of its loss under an
op-level observer (`nanscope.trace._mode`; the rules are in `nanscope.trace._rules`) and
returns where NaN and inf *start*: the first aten op whose output is non-finite while its inputs were
not. GroundingDINO writes `-inf` on purpose (ContrastiveEmbed's `masked_fill_` and
`torch.full(..., -inf)`), so NaN and inf are followed separately and such writes are kept as
`intentional_inf_sources`, not origins. A NaN made from one of them names it in `Origin.inf_from`.

Two phases (docs/trace.md): a module-level pass (`_calls`: one aminmax per module output and per
gradient at a module output, flags only for the ops outside every module call and in the backward),
then the op-level mode only inside the module calls it flagged, replayed from their saved inputs
(`_replay`). Where that cannot answer (`TraceResult.full_trace_reason`), the whole step runs again under
the op-level mode: one aminmax per floating op output and ~15-25 us of Python per aten op; device
syncs one per 256 ops or 128 MiB of held outputs, plus one for the loss and one per origin found.
Gradients come from `torch.autograd.grad`, so `.grad` is left as it was; the global module hooks,
the dispatch mode stack and the grad mode are restored on exit, also when `run()` raises. Not
supported: torch.compile'd modules (trace `model._orig_mod`) and forwards split over threads (DataParallel).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Union

import torch
from torch import nn

from nanscope.errors import CriterionError
from nanscope.findings import Finding, Severity
from nanscope.trace.records import InfSource, Origin, TraceResult, short_path

Loss = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def trace_nonfinite(
    model: nn.Module,
    run: Callable[[], Loss],
    *,
    backward: bool = True,
    two_phase: bool = True,
) -> TraceResult:
    """Replay `run()` (forward + loss, returning the loss or a dict of loss terms) and its backward.

    The backward is `torch.autograd.grad` of the summed terms with respect to the trainable
    parameters of `model` (`.grad` is not touched); it is skipped when `backward` is False, when the
    loss has no graph, or when no parameter requires grad. Exceptions from `run()` propagate unchanged
    after everything is restored. Module paths are relative to `model`.

    two_phase: first the module-level pass, then the op-level mode only inside the module calls it flagged
    (`TraceResult.replayed`); where that cannot answer (`TraceResult.full_trace_reason` says why) the step
    runs again, op by op, from the generator states and training-mode buffers it started with.
    False: the op-level trace of the whole step at once.
    """
    reason = "asked for the op-level trace of the whole step (two_phase=False)"
    calls = 0
    if two_phase:
        start = _Snapshot(model)
        quick, reason, calls = _two_phase(model, run, backward)
        if quick is not None:
            return quick
        start.restore()
    return dataclasses.replace(_op_trace(model, run, backward), module_calls=calls, full_trace_reason=reason)


def _two_phase(model: nn.Module, run: Callable[[], Loss], backward: bool) -> tuple[TraceResult | None, str, int]:
    """The module-level pass and the replay of the calls it flagged; (None, why, calls) where they cannot answer."""
    from nanscope.trace._calls import CallFlags, OutsideOps, Started
    from nanscope.trace._replay import replay_calls

    flags = CallFlags(model, grads=backward)
    outside = OutsideOps(flags)
    grad_recs: list[int] = []
    try:
        with torch.enable_grad():
            with outside, flags:  # flags exits first: it may have to put the mode back
                total = _total(run())
                loss_rec = flags.reduce(total)
            # The backward at module granularity: the gradient arriving at each module output (tensor hooks
            # registered in the forward) and the parameter gradients, one reduction each.
            params = [p for p in model.parameters() if p.requires_grad]
            backward_traced = backward and total.requires_grad and bool(params)
            if backward_traced:
                grads = torch.autograd.grad(total, params, grad_outputs=torch.ones_like(total), allow_unused=True)
                grad_recs = [flags.reduce(g) for g in grads if g is not None]
            del total
        flags.flush()
    except Started:
        return None, "NaN or inf started in the loss code", len(flags.calls)
    finally:
        flags.close()
    n = len(flags.calls)
    grad_recs += flags.grad_recs
    if outside.started():
        return None, "NaN or inf started in the loss code", n
    if flags.any_nan(grad_recs) or flags.any_inf(grad_recs):
        return None, "a gradient at a module output or of a parameter went NaN or inf in the backward", n
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
    elif flags.nan[loss_rec]:
        return None, "the loss is NaN while no module returned NaN: it starts in the loss code", n
    for c in done:
        if any(flags.inf[r] and not flags.tracked[r] for r in c.ins):
            return None, f"inf entered {_name(c.name)} through an input that no module returned", n
    made_inf = [c for c in done if flags.any_inf(c.outs) and not flags.any_inf(c.ins)]
    inner = [c for c in made_inf if not any(d.seq > c.seq and d.end < c.end for d in made_inf)]
    if flags.inf[loss_rec] and not inner:
        return None, "the loss is inf while no module made inf: it starts in the loss code", n
    if len(inner) > _MAX_REPLAYS:
        return None, f"{len(inner)} module calls made inf (more than {_MAX_REPLAYS} to replay)", n
    targets = sorted({id(c): c for c in targets + inner}.values(), key=lambda c: c.seq)
    for c in targets:
        if not flags.replayable(c):
            return None, f"{_name(c.name)} changed one of its inputs in place: its call cannot be replayed", n
    mode = replay_calls(model, targets)
    ledger = mode.ledger
    origins = tuple(sorted(ledger.origins.values(), key=lambda o: o.index))
    if nan_calls and ("forward", "nan") not in ledger.origins:
        return None, f"the replay of {_name(nan_calls[0].name)} did not make the NaN again", n
    if inner and not ledger.inf_sources:
        return None, f"the replay of {_name(inner[0].name)} did not make the inf again", n
    if any(o.source is not None and o.source.startswith("tensor ") for o in origins):
        return None, "a replayed call read a non-finite input that no module returned", n
    return TraceResult(
        forward=next((o for o in origins if o.phase == "forward"), None),
        backward=None,
        loss_finite=not (flags.nan[loss_rec] or flags.inf[loss_rec]),
        ops_seen=mode.ops_seen,
        origins=origins,
        intentional_inf_sources=tuple(s for s in ledger.inf_sources if s.intentional and s.phase == "forward"),
        backward_traced=backward_traced,
        module_calls=n,
        replayed=tuple(c.name for c in targets),
    ), "", n


_MAX_REPLAYS = 64  # module calls that made inf, replayed one by one before the whole step is traced instead


def _name(path: str) -> str:
    return path or "the root module"


class _Snapshot:
    """The generator states and training-mode buffers (BatchNorm statistics) before the module-level pass,
    put back before the step runs again op by op, so both runs see the same state."""

    def __init__(self, model: nn.Module) -> None:
        from nanscope.trace._calls import rng_states

        self._rng = rng_states()
        self._buffers = [(b, b.detach().clone()) for m in model.modules() if m.training
                         for b in m.buffers(recurse=False)]

    def restore(self) -> None:
        from nanscope.trace._calls import set_rng_states

        set_rng_states(self._rng)
        with torch.no_grad():
            for b, saved in self._buffers:
                b.copy_(saved)


def _op_trace(model: nn.Module, run: Callable[[], Loss], backward: bool) -> TraceResult:
    """The whole step under the op-level mode."""
    from nanscope.trace._mode import NonfiniteMode

    mode = NonfiniteMode(model)
    # One context for forward and backward: backward ops are named after the forward module that
    # made their autograd node.
    with torch.enable_grad(), mode.modules, mode:
        out = run()
        with mode.paused():
            total = _total(out)
            loss_finite = bool(torch.isfinite(total.detach()).all())
            seed = torch.ones_like(total)
        params = [p for p in model.parameters() if p.requires_grad]
        backward_traced = backward and total.requires_grad and bool(params)
        if backward_traced:
            torch.autograd.grad(total, params, grad_outputs=seed, allow_unused=True)
    mode.flush()
    origins = tuple(sorted(mode.ledger.origins.values(), key=lambda o: o.index))
    return TraceResult(
        forward=next((o for o in origins if o.phase == "forward"), None),
        backward=next((o for o in origins if o.phase == "backward"), None),
        loss_finite=loss_finite,
        ops_seen=mode.ops_seen,
        origins=origins,
        intentional_inf_sources=tuple(s for s in mode.ledger.inf_sources if s.intentional and s.phase == "forward"),
        backward_traced=backward_traced,
    )


def _total(out: object) -> torch.Tensor:
    """The loss, or the sum of the loss terms, as one tensor."""
    if isinstance(out, torch.Tensor):
        terms = [out]
    elif isinstance(out, Mapping) and out and all(isinstance(v, torch.Tensor) for v in out.values()):
        terms = list(out.values())
    else:
        got = (f"a mapping with values of type {sorted({type(v).__name__ for v in out.values()})}"
               if isinstance(out, Mapping) else type(out).__name__)
        raise CriterionError(f"run() returned {got}; expected a loss tensor or a non-empty mapping of loss tensors")
    return torch.stack([t.float().sum() for t in terms]).sum()


def trace_findings(result: TraceResult) -> list[Finding]:
    """NS301 for the forward origins, NS302 for the backward ones; empty when nothing started."""
    findings = []
    for code, phase in (("NS301", "forward"), ("NS302", "backward")):
        found = [o for o in result.origins if o.phase == phase]
        if not found:
            continue
        first = found[0]
        findings.append(Finding(
            code=code, severity=Severity.ERROR, count=len(found), message=describe(first),
            where=tuple(_where(o) for o in found),
            data={"origins": [_origin_data(o) for o in found], "loss_finite": result.loss_finite,
                  "ops_seen": result.ops_seen, "module_calls": result.module_calls,
                  "replayed": list(result.replayed), "full_trace_reason": result.full_trace_reason,
                  "intentional_inf": [_source_text(s) for s in result.intentional_inf_sources]},
        ))
    return findings


def describe(o: Origin) -> str:
    """One sentence: what, where, from what."""
    what = "NaN" if o.kind == "nan" else "inf"
    count = o.nan_count if o.kind == "nan" else o.inf_count
    text = (f"{what} first appears in the {o.phase} at {_op_name(o.op)}"
            f"{' (backward of ' + o.grad_fn + ')' if o.grad_fn else ''} {_in(o)}"
            f"{_at(o)}: {count} of {_numel(o.shape)} values"
            f" of a {list(o.shape)} {o.dtype} output")
    if o.source:
        text += f"; its input {o.source} was already non-finite"
    if o.inf_from is not None:
        text += f"; made from inf written by {_source_text(o.inf_from)}"
    return text + "."


def _at(o: Origin) -> str:
    if o.frame is None:
        return ""
    return f" at {o.frame}" if o.phase == "forward" else f", the backward of the forward at {o.frame}"


def _in(o: Origin) -> str:
    return "in the loss code, outside any module" if o.module is None else f"in {o.where}"


def _source_text(s: InfSource) -> str:
    where = ("outside any module" if s.module is None
             else f"{s.module or 'the root module'}{' (' + s.module_type + ')' if s.module_type else ''}")
    text = f"{_op_name(s.op)} in {where}"
    if s.source:
        text += f" from {s.source}"
    if s.frame:
        text += f" at {s.frame}"
    return text


def _where(o: Origin) -> dict[str, object]:
    return {"phase": o.phase, "module": o.module if o.module is not None else "(loss code)", "op": _op_name(o.op),
            "file": short_path(o.frame.file) if o.frame else None, "line": o.frame.line if o.frame else None,
            "kind": o.kind}


def _origin_data(o: Origin) -> dict[str, object]:
    return {"phase": o.phase, "op": o.op, "module": o.module, "module_type": o.module_type, "kind": o.kind,
            "nan_count": o.nan_count, "inf_count": o.inf_count, "shape": list(o.shape), "dtype": o.dtype,
            "first_indices": [list(i) for i in o.first_indices], "index": o.index, "grad_fn": o.grad_fn,
            "source": o.source, "file": o.frame.file if o.frame else None, "line": o.frame.line if o.frame else None,
            "function": o.frame.function if o.frame else None,
            "inf_from": _source_text(o.inf_from) if o.inf_from else None}


def _op_name(op: str) -> str:
    """`aten.masked_fill_.Scalar` -> `masked_fill_`."""
    parts = op.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "aten" else op


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
