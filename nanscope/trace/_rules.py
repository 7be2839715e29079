"""The origin rules of `nanscope.trace`: from per-tensor NaN/inf flags to the first op that made them.

`Ledger` holds one *record* per observed tensor value (an op output, a tensor that entered from
outside, or a tensor re-read after an in-place change) and, once the flags of a batch of ops are known,
`resolve(op)` applies the rules below in op order:

- NaN, forward: the output has NaN and every input holding NaN is a *source* (a parameter, buffer or
  batch tensor that was already NaN when first read). With such an input, `Origin.source` names it.
- NaN, backward: the output has NaN and no input (gradients, saved tensors) holds NaN.
- inf: the output has inf and no input carries inf, except (a) intentional writes: an infinite Python
  scalar argument (`full`, `fill_`, `masked_fill`, `where`, `scalar_tensor`), an infinite buffer or
  an infinite 0-dim constant; these become `InfSource(intentional=True)` and never origins; and (b) a
  parameter or batch tensor already holding inf, which makes its first reader the origin.
- Provenance: every record holding inf remembers the `InfSource` that wrote it, so a NaN origin fed
  by infinities names them (`Origin.inf_from`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from nanscope.trace.records import Frame, InfSource, Origin

_FIRST_INDICES = 3

# Record kinds.
OP = 0  # the output of a traced op
REFRESH = 1  # a known tensor re-read after an in-place change (by an alias) since it was recorded
PARAM = 2  # entered from outside: a parameter, or a tensor not made by a traced op (the batch)
CONST = 3  # entered from outside, infinities allowed: a buffer, a 0-dim literal, anything in the backward
_SOURCES = (PARAM, CONST)


@dataclass(slots=True)
class Op:
    """One traced aten op; `tensors` hold its floating outputs until their flags are read."""

    index: int
    name: str
    backward: bool
    module: str | None
    frame: tuple[types.CodeType, int] | None
    grad_fn: str | None
    ins: tuple[int, ...]  # records of the floating inputs
    outs: tuple[int, ...]  # records of the floating outputs (a view reuses its input's record)
    tensors: tuple[torch.Tensor, ...]
    inf_scalar: bool  # an infinite Python scalar among the arguments


class Ledger:
    """Tensor records, their flags, and the origins found so far."""

    def __init__(self, module_types: dict[str, str]) -> None:
        self._types = module_types
        self.kind: list[int] = []
        self.nan: list[bool] = []
        self.inf: list[bool | None] = []  # None: unknown, because the tensor holds NaN (min/max are NaN)
        self._prov: list[int] = []  # index into inf_sources of the write that made its inf; -1: none
        self._source: dict[int, str] = {}  # source record -> "parameter a.b", "buffer c", ...
        self._parent: dict[int, int] = {}  # refreshed record -> the record it replaces
        self.inf_sources: list[InfSource] = []
        self._inf_source_key: dict[tuple[object, ...], int] = {}
        self.origins: dict[tuple[str, str], Origin] = {}  # (phase, kind) -> the first origin

    def new(self, kind: int, *, source: str | None = None, parent: int | None = None) -> int:
        rec = len(self.kind)
        self.kind.append(kind)
        self.nan.append(False)
        self.inf.append(False)
        self._prov.append(-1)
        if source is not None:
            self._source[rec] = source
        if parent is not None:
            self._parent[rec] = parent
        return rec

    def written_by(self, rec: int) -> InfSource | None:
        """The inf source that wrote `rec`'s infinities (None: none known)."""
        i = self._prov[rec]
        return self.inf_sources[i] if i >= 0 else None

    def attribute(self, rec: int, source: InfSource) -> None:
        """`rec`'s infinities were written by `source` (a placeholder its caller replaces once known)."""
        self._prov[rec] = len(self.inf_sources)
        self.inf_sources.append(source)

    def set_flags(self, rec: int, nan: bool, inf: bool) -> None:
        self.nan[rec] = nan
        self.inf[rec] = None if nan else inf

    def resolve(self, op: Op) -> None:
        """Apply the rules to `op`; the flags of all its records must be set."""
        backward = op.backward
        for r in op.ins:
            if self._prov[r] == -1 and self.inf[r] is not False:
                if self.kind[r] == REFRESH:
                    self._prov[r] = self._prov[self._parent[r]]
                elif self.kind[r] == CONST and not backward and self.inf[r]:
                    self._prov[r] = self._inf_source(op, intentional=True, source=self._source.get(r))
        if not set(op.outs) - set(op.ins):
            return  # a view reuses its input's record: the op that wrote the values is the one to blame
        phase = "backward" if backward else "forward"
        nan_in = [r for r in op.ins if self.nan[r]]
        inf_in = [r for r in op.ins if self.inf[r] is not False]
        out_nan = [i for i, r in enumerate(op.outs) if self.nan[r]]
        out_inf = [i for i, r in enumerate(op.outs) if self.inf[r]]
        if out_nan and (phase, "nan") not in self.origins:
            sources = [r for r in nan_in if self.kind[r] in _SOURCES]
            if not nan_in or (not backward and len(sources) == len(nan_in)):
                self._origin(op, "nan", out_nan[0], source=self._source.get(sources[0]) if sources else None,
                             inf_from=next((self._prov[r] for r in inf_in if self._prov[r] >= 0), -1))
        if out_inf:
            entered = [r for r in inf_in if self.kind[r] == PARAM and not backward]
            carried = [r for r in inf_in if r not in entered]
            if carried:
                prov = next((self._prov[r] for r in carried if self._prov[r] >= 0), -1)
            elif op.inf_scalar and not entered:
                prov = self._inf_source(op, intentional=True)
            else:
                source = self._source.get(entered[0]) if entered else None
                prov = self._inf_source(op, intentional=False, source=source)
                if (phase, "inf") not in self.origins:
                    self._origin(op, "inf", out_inf[0], source=source, inf_from=-1)
            for i in out_inf:
                if self._prov[op.outs[i]] == -1:
                    self._prov[op.outs[i]] = prov

    def _module_type(self, module: str | None) -> str | None:
        return self._types.get(module) if module is not None else None

    def _inf_source(self, op: Op, *, intentional: bool, source: str | None = None) -> int:
        frame = _frame(op)
        key = (op.name, op.module, frame, intentional, source)
        idx = self._inf_source_key.get(key)
        if idx is None:
            idx = self._inf_source_key[key] = len(self.inf_sources)
            self.inf_sources.append(InfSource(
                op=op.name, module=op.module, module_type=self._module_type(op.module), frame=frame,
                index=op.index, phase="backward" if op.backward else "forward", intentional=intentional,
                source=source,
            ))
        return idx

    def _origin(self, op: Op, kind: str, out: int, *, source: str | None, inf_from: int) -> None:
        """Counts and first positions are read from the held output (one sync, once per origin)."""
        t = op.tensors[out].detach()
        with torch.no_grad():
            nan_mask, inf_mask = torch.isnan(t), torch.isinf(t)
            counts = torch.stack([nan_mask.sum(), inf_mask.sum()]).tolist()
            mask = nan_mask if kind == "nan" else inf_mask
            first = torch.nonzero(mask)[:_FIRST_INDICES].tolist() if t.dim() else [[]] * int(bool(mask))
        phase = "backward" if op.backward else "forward"
        self.origins[(phase, kind)] = Origin(
            phase=phase, op=op.name, module=op.module, module_type=self._module_type(op.module), kind=kind,
            nan_count=int(counts[0]), inf_count=int(counts[1]), shape=tuple(t.shape),
            dtype=str(t.dtype).removeprefix("torch."), first_indices=tuple(tuple(i) for i in first),
            frame=_frame(op), index=op.index, grad_fn=op.grad_fn, source=source,
            inf_from=self.inf_sources[inf_from] if inf_from >= 0 else None,
        )


def _frame(op: Op) -> Frame | None:
    if op.frame is None:
        return None
    code, line = op.frame
    return Frame(file=code.co_filename, line=line, function=code.co_name)
