"""The op-level observer behind `nanscope.trace`: a TorchDispatchMode that finds where NaN/inf start.

Every aten op run while the mode is on (forward, loss and backward) gets a record: its inputs and
outputs as *tensor records*, the innermost module (from ModuleTracker, which also follows the
backward), the innermost user frame (forward only) and, in the backward, the autograd node.

Cost model. A floating output costs one `torch.aminmax` on its own device (NaN propagates through
min/max, so one reduction tells NaN and inf apart) and no synchronization: the 0-dim results are
queued and read in batches (`_FLUSH_OPS` ops or `_FLUSH_BYTES` of retained outputs, whichever comes
first), i.e. one device->host copy per batch. View ops reuse their input's record (no reduction).
An input is checked only when no earlier op produced it, or when it was modified in place since
(the tensor's version counter moved). Outputs are held until their batch is read, so the origin's
counts and first indices can be computed without a second replay.

Origin rules (per phase, NaN and inf separately):
- forward NaN: an op whose output has NaN while no input had NaN made by an earlier op. An input that
  was already NaN when it entered (a parameter, buffer or batch tensor) makes its first reader the
  origin, named with the `source`.
- backward NaN: an op whose output has NaN while none of its inputs (gradients and saved tensors as
  seen at dispatch) had NaN.
- inf: the same with inf, except intentional writes: an op with an infinite Python scalar argument
  (`full`, `fill_`, `masked_fill`, `where`, `scalar_tensor` ...) or an infinite buffer or 0-dim
  constant is recorded as an intentional source and never as an origin.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import sysconfig
import types
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.module_tracker import ModuleTracker
from torch.utils.weak import WeakIdKeyDictionary

from nanscope.trace import Frame, InfSource, Origin

_FLUSH_OPS = 256  # ops between two reads of the queued flags (one device sync each)
_FLUSH_BYTES = 128 * 2**20  # outputs held for origin details before a read is forced
_FIRST_INDICES = 3

# Record kinds.
_OP, _ENTRY, _BENIGN, _REFRESH = 0, 1, 2, 3  # op output; non-finite-capable source; buffer/constant; re-read


def _package_dir(name: str) -> str | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "")


_INTERNAL_DIRS = tuple(d for d in (_package_dir("torch"), _package_dir("torchvision"), _package_dir("functorch")) if d)
_STDLIB = os.path.join(sysconfig.get_paths()["stdlib"], "")
_THIS_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


def _is_internal(filename: str) -> bool:
    """Frames nanscope never blames: torch, torchvision, the standard library and the tracer itself."""
    if filename.startswith("<"):
        return True
    if filename.startswith(_INTERNAL_DIRS):
        return True
    if filename.startswith(_STDLIB) and "-packages" not in filename:
        return True
    return filename.startswith(_THIS_PACKAGE) and os.path.basename(filename) in ("trace.py", "_nonfinite_mode.py")


@dataclass
class _Op:
    index: int
    name: str
    backward: bool
    module: str | None
    frame: tuple[types.CodeType, int] | None
    grad_fn: str | None
    ins: tuple[int, ...]  # tensor records of the floating inputs
    outs: tuple[int, ...]  # tensor records of the floating outputs
    tensors: tuple[torch.Tensor, ...]  # the outputs, held until the flags are read
    inf_scalar: bool  # an infinite Python scalar among the arguments


class _Tracker(ModuleTracker):
    """ModuleTracker that names modules by their path from `root` ("" is the root itself)."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self._names = names

    def _get_mod_name(self, mod: nn.Module) -> str:
        name = self._names.get(id(mod))
        return name if name is not None else f"<outside>.{super()._get_mod_name(mod)}"


class NonfiniteMode(TorchDispatchMode):
    """Records every op; `finish()` returns the origins. Enter `tracker` around it (see `trace.py`)."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._paths: dict[int, str] = {id(m): p for p, m in root.named_modules(remove_duplicate=True)}
        self._types: dict[str, str] = {p: type(m).__name__ for p, m in root.named_modules()}
        self._sources: dict[int, tuple[str, int]] = {}
        for n, p in root.named_parameters(remove_duplicate=True):
            self._sources[id(p)] = (f"parameter {n}", _ENTRY)
        for n, b in root.named_buffers(remove_duplicate=True):
            self._sources[id(b)] = (f"buffer {n}", _BENIGN)
        self.tracker = _Tracker(self._paths)
        self._depth: dict[str, int] = {"Global": -1}
        self._code_internal: dict[types.CodeType, bool] = {}
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (record, version)
        # tensor records
        self._kind: list[int] = []
        self._source: dict[int, str] = {}
        self._parent: dict[int, int] = {}  # refreshed record -> the record it replaces
        self._nan: list[bool] = []
        self._inf: list[bool | None] = []  # None: unknown (the tensor holds NaN)
        self._prov: list[int] = []  # index into self.inf_sources of the write that made its inf, -1 none
        self._queue: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        # ops
        self.ops_seen = 0
        self._paused = False
        self._pending: list[_Op] = []
        self._pending_bytes = 0
        self.inf_sources: list[InfSource] = []
        self._inf_source_key: dict[tuple[Any, ...], int] = {}
        self.origins: dict[tuple[str, str], Origin] = {}  # (phase, kind) -> first origin

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run inside are not recorded (nanscope's own bookkeeping between forward and backward)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    # ---------------------------------------------------------------- recording
    def __torch_dispatch__(self, func: Any, types_: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        index = self.ops_seen
        self.ops_seen += 1
        backward = torch._C._current_graph_task_id() != -1
        ins: list[int] = []
        in_tensors: list[torch.Tensor] = []
        inf_scalar = False
        for a in _flat(args, kwargs):
            if isinstance(a, torch.Tensor):
                if a.is_floating_point():
                    ins.append(self._input_record(a, backward))
                    in_tensors.append(a)
            elif isinstance(a, float) and math.isinf(a):
                inf_scalar = True
        out = func(*args, **kwargs)
        tensors = [t for t in _flat_out(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not tensors:
            return out
        kind = _op_kind(func)
        if kind == _VIEW and ins:
            # Autograd makes the view share its base's version counter after this returns.
            version = _version(in_tensors[0])
            outs = tuple(self._remember(t, ins[0], version) for t in tensors)
        elif kind == _UNINITIALIZED:
            outs = tuple(self._remember(t, self._new_record(None, _OP), _version(t)) for t in tensors)
        else:
            # ADInplaceOrView bumps the version of a mutated tensor once this returns: expect it.
            bump = kind == _MUTATING
            outs = tuple(self._new_record(t, _OP, bump=bump and any(t is a for a in in_tensors)) for t in tensors)
            self._pending_bytes += sum(t.numel() * t.element_size() for t in tensors)
        node = torch._C._current_autograd_node() if backward else None
        self._pending.append(_Op(
            index=index, name=str(func), backward=backward, module=self._innermost_module(),
            frame=None if backward else self._user_frame(), grad_fn=node.name() if node is not None else None,
            ins=tuple(ins), outs=outs, tensors=tuple(tensors), inf_scalar=inf_scalar,
        ))
        if len(self._pending) >= _FLUSH_OPS or self._pending_bytes >= _FLUSH_BYTES:
            self.flush()
        return out

    def _input_record(self, t: torch.Tensor, backward: bool) -> int:
        known = self._known.get(t)
        version = _version(t)
        if known is not None:
            rec, seen = known
            if seen == version and version is not None:
                return rec
            new = self._new_record(t, _REFRESH)
            self._parent[new] = rec
            return new
        name, kind = self._sources.get(id(t), (None, _ENTRY))
        if backward or t.numel() <= 1:
            kind = _BENIGN  # backward: grads and saved tensors; 0-dim: literals such as torch.tensor(-inf)
        rec = self._new_record(t, kind)
        if name is None:
            name = f"tensor {list(t.shape)} {str(t.dtype).removeprefix('torch.')} not made by a traced op"
        self._source[rec] = name
        return rec

    def _new_record(self, t: torch.Tensor | None, kind: int, *, bump: bool = False) -> int:
        """A record for `t`'s values, with its flags queued (None: no values, e.g. `empty`)."""
        rec = len(self._kind)
        self._kind.append(kind)
        self._nan.append(False)
        self._inf.append(False)
        self._prov.append(-1)
        if t is None:
            return rec
        if t.numel():
            with torch.no_grad():
                mn, mx = torch.aminmax(_dense_flat(t.detach()))
            recs, mins, maxs = self._queue.setdefault((t.device, t.dtype), ([], [], []))
            recs.append(rec)
            mins.append(mn)
            maxs.append(mx)
        version = _version(t)
        self._known[t] = (rec, version + 1 if bump and version is not None else version)
        return rec

    def _remember(self, t: torch.Tensor, rec: int, version: int | None) -> int:
        self._known[t] = (rec, version)
        return rec

    def _innermost_module(self) -> str | None:
        best, depth = None, -1
        for name in self.tracker.parents:
            d = self._depth.get(name)
            if d is None:
                d = self._depth[name] = -1 if name == "Global" else (0 if name == "" else name.count(".") + 1)
            if d > depth:
                best, depth = name, d
        return best

    def _user_frame(self) -> tuple[types.CodeType, int] | None:
        f = sys._getframe(1)
        cache = self._code_internal
        while f is not None:
            code = f.f_code
            internal = cache.get(code)
            if internal is None:
                internal = cache[code] = _is_internal(code.co_filename)
            if not internal:
                return code, f.f_lineno
            f = f.f_back
        return None

    # ---------------------------------------------------------------- resolution
    def flush(self) -> None:
        """Read the queued flags (one device->host copy per device and dtype) and resolve pending ops."""
        with torch.no_grad():
            for (_, _), (recs, mins, maxs) in self._queue.items():
                mm = torch.stack([torch.stack(mins), torch.stack(maxs)]).cpu()  # [2, n]
                nan = (torch.isnan(mm[0]) | torch.isnan(mm[1])).tolist()
                inf = (torch.isinf(mm[0]) | torch.isinf(mm[1])).tolist()
                for r, n, i in zip(recs, nan, inf):
                    self._nan[r] = n
                    self._inf[r] = None if n else i
        self._queue = {}
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for op in pending:
            self._resolve(op)

    def _resolve(self, op: _Op) -> None:
        phase = "backward" if op.backward else "forward"
        for r in op.ins:
            if self._kind[r] == _REFRESH and self._prov[r] == -1 and self._inf[r] is not False:
                self._prov[r] = self._prov[self._parent[r]]
            elif (not op.backward and r in self._source and self._kind[r] == _BENIGN and self._inf[r]
                  and self._prov[r] == -1):
                self._prov[r] = self._inf_source(op, intentional=True, source=self._source[r])
        if not set(op.outs) - set(op.ins):
            return  # a view: it reuses its input's record, the op that wrote the values is the one to blame
        nan_in = [r for r in op.ins if self._nan[r]]
        inf_in = [r for r in op.ins if self._inf[r] is not False]
        out_nan = [i for i, r in enumerate(op.outs) if self._nan[r]]
        out_inf = [i for i, r in enumerate(op.outs) if self._inf[r]]
        # NaN
        if out_nan and (phase, "nan") not in self.origins:
            entry = [r for r in nan_in if self._kind[r] == _ENTRY]
            if not nan_in or (not op.backward and len(entry) == len(nan_in)):
                self._origin(op, "nan", out_nan[0], source=self._source.get(entry[0]) if entry else None,
                             inf_from=next((self._prov[r] for r in inf_in if self._prov[r] >= 0), -1))
        # inf
        if out_inf:
            carried = [r for r in inf_in if self._kind[r] != _ENTRY]
            entry = [r for r in inf_in if self._kind[r] == _ENTRY]
            if carried:
                prov = next((self._prov[r] for r in carried if self._prov[r] >= 0), -1)
            elif op.inf_scalar and not entry:
                prov = self._inf_source(op, intentional=True)
            else:
                source = self._source.get(entry[0]) if entry else None
                prov = self._inf_source(op, intentional=False, source=source)
                if (phase, "inf") not in self.origins:
                    self._origin(op, "inf", out_inf[0], source=source, inf_from=-1)
            for i in out_inf:
                if self._prov[op.outs[i]] == -1:
                    self._prov[op.outs[i]] = prov

    def _inf_source(self, op: _Op, *, intentional: bool, source: str | None = None) -> int:
        frame = self._frame(op)
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

    def _origin(self, op: _Op, kind: str, out: int, *, source: str | None, inf_from: int) -> None:
        t = op.tensors[out].detach()
        with torch.no_grad():
            nan_mask, inf_mask = torch.isnan(t), torch.isinf(t)
            counts = torch.stack([nan_mask.sum(), inf_mask.sum()]).tolist()
            mask = nan_mask if kind == "nan" else inf_mask
            first = torch.nonzero(mask.reshape(t.shape))[:_FIRST_INDICES].tolist() if t.dim() else [[]] * int(bool(mask))
        phase = "backward" if op.backward else "forward"
        self.origins[(phase, kind)] = Origin(
            phase=phase, op=op.name, module=op.module, module_type=self._module_type(op.module), kind=kind,
            nan_count=int(counts[0]), inf_count=int(counts[1]), shape=tuple(t.shape),
            dtype=str(t.dtype).removeprefix("torch."), first_indices=tuple(tuple(i) for i in first),
            frame=self._frame(op), index=op.index, grad_fn=op.grad_fn, source=source,
            inf_from=self.inf_sources[inf_from] if inf_from >= 0 else None,
        )

    def _module_type(self, module: str | None) -> str | None:
        return self._types.get(module) if module is not None else None

    @staticmethod
    def _frame(op: _Op) -> Frame | None:
        if op.frame is None:
            return None
        code, line = op.frame
        return Frame(file=code.co_filename, line=line, function=code.co_name)


def _dense_flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of the same elements when `t` is dense in memory (permuted, channels-last ...).

    Reductions over strided tensors are several times slower on CPU; the set of values is all we need.
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


_VIEW, _MUTATING, _UNINITIALIZED, _FUNCTIONAL = 0, 1, 2, 3
_UNINITIALIZED_OPS = frozenset({"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided",
                                "empty_permuted"})
_OP_KINDS: dict[Any, int] = {}


def _op_kind(func: Any) -> int:
    kind = _OP_KINDS.get(func)
    if kind is None:
        schema = getattr(func, "_schema", None)
        if getattr(func, "is_view", False):
            kind = _VIEW
        elif schema is not None and schema.is_mutable:
            kind = _MUTATING
        elif schema is not None and schema.name.split("::")[-1] in _UNINITIALIZED_OPS:
            kind = _UNINITIALIZED
        else:
            kind = _FUNCTIONAL
        _OP_KINDS[func] = kind
    return kind


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: always re-read
        return None


def _flat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Arguments one list level deep (aten arguments are flat except Tensor[] and Scalar[])."""
    out: list[Any] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def _flat_out(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        flat: list[Any] = []
        for o in out:
            flat.extend(o if isinstance(o, (list, tuple)) else (o,))
        return flat
    return [out]
