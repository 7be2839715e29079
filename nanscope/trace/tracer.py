"""The first non-finite operation, in the forward and in the backward (findings NS301, NS302).

`trace_nonfinite(model, run)` replays `run()` (forward + loss) and the backward of its loss under an
op-level observer (`nanscope.trace._mode`; the rules are in `nanscope.trace._rules`) and
returns where NaN and inf *start*: the first aten op whose output is non-finite while its inputs were
not. GroundingDINO writes `-inf` on purpose (ContrastiveEmbed's `masked_fill_` and
`torch.full(..., -inf)`), so NaN and inf are followed separately and such writes are kept as
`intentional_inf_sources`, not origins. A NaN made from one of them names it in `Origin.inf_from`.

Two phases (docs/trace.md, `_phases`): a module-level pass (`_calls`: one aminmax per module output and
per gradient at a module output; the loss code op by op, `_loss`), then the op-level mode only inside the
module calls it flagged, replayed from their saved inputs (`_replay`), and inside the one call whose
backward made a non-finite gradient, replayed from its inputs and the gradient at its outputs (`_backward`).
Where that cannot answer (`TraceResult.full_trace_reason`), the whole step runs again under
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

from nanscope.findings import Finding, Severity
from nanscope.trace._loss import total_loss
from nanscope.trace import _phases
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

    two_phase: first the module-level pass (the loss code op by op), then the op-level mode only inside the
    module calls it flagged (`TraceResult.replayed`) and the one call whose backward made a non-finite gradient
    (`TraceResult.replayed_backward`); where that cannot answer (`TraceResult.full_trace_reason` says why) the step
    runs again, op by op, from the generator states and training-mode buffers it started with.
    False: the op-level trace of the whole step at once.
    """
    reason = "asked for the op-level trace of the whole step (two_phase=False)"
    calls = 0
    if two_phase:
        start = _Snapshot(model)
        quick, reason, calls = _phases.two_phase(model, run, backward)
        if quick is not None:
            return quick
        start.restore()
    return dataclasses.replace(_op_trace(model, run, backward), module_calls=calls, full_trace_reason=reason)


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
            total = total_loss(out)
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
