"""Phase 1's view of the loss code: the op-level mode on every op outside the model's module calls.

`LossOps(root, flags)` is the op-level `NonfiniteMode`, entered around `run()` beside `CallFlags`, which takes it
off the dispatch stack while a module of `root` runs: the model's ops pay no Python dispatch, the loss code's
(and any op `run()` makes outside the model) are traced one by one, in the one real run, so an origin in the
loss code is named without running anything again. Its backward runs as a separate pass,
`loss_backward(total)`: `torch.autograd.grad` of the loss with respect to what the loss code read from the
model (and the leaves it read), under this mode, so only the loss code's backward ops are traced.

A tensor a module of `root` returned enters the loss code as an op output (not as a batch tensor): what the
model computed is not an origin here, phase 1's flags and replays judge it. Where such a tensor carries inf,
the inf source that wrote it is not known yet (the model ran without the op-level mode): its record points at
a placeholder that `resolve_inf_from` replaces once the calls that made inf have been replayed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
from torch import nn

from nanscope.errors import CriterionError
from nanscope.trace._calls import CallFlags
from nanscope.trace._mode import NonfiniteMode
from nanscope.trace._rules import OP
from nanscope.trace.records import InfSource, Origin


class LossOps(NonfiniteMode):
    """The op-level mode outside the model's module calls. Enter `modules`, then this, then `flags`."""

    def __init__(self, root: nn.Module, flags: CallFlags) -> None:
        super().__init__(root)
        self._flags = flags
        flags.outside = self
        self.read: list[torch.Tensor] = []  # tensors requiring grad that the loss code read and did not make
        self.read_ids: set[int] = set()
        self.read_recs: set[int] = set()  # CallFlags records of the module outputs among them
        self.foreign: list[int] = []  # ledger records of tensors with a graph that no module returned
        self.pending: dict[int, tuple[InfSource, Any, int]] = {}  # placeholder index -> (it, autograd node, record)

    def __torch_dispatch__(self, func: Any, types_: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if self._flags.busy or self._flags._open:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types_, args, kwargs)

    def _input_record(self, t: torch.Tensor, backward: bool) -> int:
        known = self._known.get(id(t))
        if known is not None and known[0]() is t:
            return super()._input_record(t, backward)
        model_rec = None if backward else self._flags.returned(t)
        if not backward and t.requires_grad and id(t) not in self.read_ids:
            self.read_ids.add(id(t))
            self.read.append(t)
            if model_rec is not None:
                self.read_recs.add(model_rec)
        if model_rec is None:
            rec = super()._input_record(t, backward)
            if not backward and t.grad_fn is not None:
                self.foreign.append(rec)  # made in the run, but no module returned it (a tensor the model stashed)
            return rec
        rec = self._record(t, OP)
        if self._flags.inf[model_rec] or self._flags.nan[model_rec] or t.device.type != "cpu":
            placeholder = InfSource(op="<model output>", module=None, module_type=None, frame=None, index=-1,
                                    phase="forward", intentional=False)
            self.pending[len(self.ledger.inf_sources)] = (placeholder, t.grad_fn, model_rec)
            self.ledger.attribute(rec, placeholder)
        return rec

    def loss_backward(self, total: torch.Tensor) -> None:
        """The loss code's backward alone, traced (the graph must have been kept)."""
        inputs = [t for t in self.read if t.requires_grad]
        if not inputs:
            return
        seed = torch.ones_like(total)
        self._flags.grads_paused = True
        try:
            with self:
                torch.autograd.grad(total, inputs, grad_outputs=seed, allow_unused=True)
        finally:
            self._flags.grads_paused = False
        self.flush()

    def placeholders(self) -> set[int]:
        return {id(p) for p, _, _ in self.pending.values()}

    def resolve_inf_from(self, source_of: Callable[[Any], object]) -> dict[int, InfSource | None]:
        """id(placeholder) -> the inf source found by walking its tensor's autograd graph back to a module output
        (`source_of(node)`: an InfSource, PRUNE to stop walking there, or None to keep walking), None where none is
        found."""
        found: dict[int, InfSource | None] = {}
        for placeholder, node, rec in self.pending.values():
            found[id(placeholder)] = _walk(node, source_of) if self._flags.inf[rec] else None
        return found


_MAX_NODES = 20000  # autograd nodes visited per tensor before giving up


PRUNE = object()  # `source_of` answer: nothing to find above this node


def _walk(node: Any, source_of: Callable[[Any], object]) -> InfSource | None:
    """Depth first through `next_functions` in input order: the op-level rules follow an op's first input that
    carries inf, and an autograd node lists its inputs in that order."""
    stack, seen = [node], set()
    while stack and len(seen) < _MAX_NODES:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        answer = source_of(n)
        if answer is PRUNE:
            continue
        if isinstance(answer, InfSource):
            return answer
        stack.extend(reversed([f for f, _ in n.next_functions]))
    return None


def swap_inf_from(origins: list[Origin], found: dict[int, InfSource | None]) -> list[Origin]:
    """Origins whose `inf_from` is a placeholder get what `resolve_inf_from` found."""
    return [dataclasses.replace(o, inf_from=found[id(o.inf_from)]) if o.inf_from is not None
            and id(o.inf_from) in found else o for o in origins]


def total_loss(out: object) -> torch.Tensor:
    """The loss `run()` returned, or the sum of its terms, as one float32 0-dim tensor."""
    if isinstance(out, torch.Tensor):
        terms = [out]
    elif isinstance(out, Mapping) and out and all(isinstance(v, torch.Tensor) for v in out.values()):
        terms = list(out.values())
    else:
        got = (f"a mapping with values of type {sorted({type(v).__name__ for v in out.values()})}"
               if isinstance(out, Mapping) else type(out).__name__)
        raise CriterionError(f"run() returned {got}; expected a loss tensor or a non-empty mapping of loss tensors")
    return torch.stack([t.float().sum() for t in terms]).sum()
