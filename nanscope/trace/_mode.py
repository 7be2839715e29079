"""The op-level observer behind `nanscope.trace`: a TorchDispatchMode that records every aten op.

Each op run while the mode is on (forward, loss and backward: autograd carries dispatch modes onto its
device threads) is noted with its floating inputs and outputs as records of a `Ledger`, the innermost
module, the innermost user frame (forward only) and, in the backward, the autograd node and the module
whose forward created that node. `_nonfinite_rules` turns the flags into origins.

Modules: global forward pre/post hooks keep a stack of module paths (removed on exit). For the backward,
each forward op's autograd node is mapped to the module that ran it. torch's ModuleTracker does both
jobs but registers a multi-grad hook on every module's inputs and outputs: ~90 us per module call,
which alone cost more than all the checks on the demo model.

Cost model. A floating output costs one `torch.aminmax` on its own device and no synchronization (NaN
propagates through min/max, so one reduction tells NaN, inf and finite apart). The 0-dim results are
queued and read in batches of `_FLUSH_OPS` ops, or sooner once `_FLUSH_BYTES` of outputs are held:
one device->host copy per batch and dtype. View ops reuse their input's record (no reduction); an
input is reduced only when no traced op made it, or when it changed in place since (its version
counter moved). Outputs are held until their batch is read, so an origin's counts and first indices
come without a second replay.
"""

from __future__ import annotations

import contextlib
import math
import types
import weakref
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nanscope.replay.module_stats import dense_flat as _dense_flat
from nanscope.trace._frames import user_frame
from nanscope.trace._rules import CONST, OP, PARAM, REFRESH, Ledger, Op

_FLUSH_OPS = 256  # ops between two reads of the queued flags (one device sync each)
_FLUSH_BYTES = 128 * 2**20  # outputs held for origin details before a read is forced


class NonfiniteMode(TorchDispatchMode):
    """Records ops into `ledger`. Enter `modules` before the mode; keep both on for the backward."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        named = list(root.named_modules())
        self.ledger = Ledger({p: type(m).__name__ for p, m in named})
        self.modules = _ModuleStack({id(m): p for p, m in named})
        self._sources: dict[int, tuple[str, int]] = {id(p): (f"parameter {n}", PARAM)
                                                     for n, p in root.named_parameters()}
        self._sources.update({id(b): (f"buffer {n}", CONST) for n, b in root.named_buffers()})
        # id(tensor) -> (weak reference, record, expected version); the reference rules out a reused id
        self._known: dict[int, tuple[weakref.ref[torch.Tensor], int, int | None]] = {}
        self._node_module: dict[Any, str | None] = {}  # autograd node -> module of the forward op that made it
        # autograd node -> the user frame of the forward op that made it: a backward origin names the line
        # whose backward produced it (what detect_anomaly's traceback points at)
        self._node_frame: dict[Any, tuple[types.CodeType, int] | None] = {}
        self._last_outputs: tuple[str | None, tuple[types.CodeType, int] | None, list[torch.Tensor]] | None = None
        # (device, dtype) -> (records, their minima, their maxima), read at the next flush
        self._queue: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[torch.Tensor], list[torch.Tensor]]]
        self._queue = {}
        self._pending: list[Op] = []
        self._pending_bytes = 0
        self._internal: dict[types.CodeType, bool] = {}
        self._paused = False
        self.ops_seen = 0
        # The module-level replay (`_replay`) calls one module from its saved inputs: frames above it are the
        # replay's, so reaching `stop_code` names `outer_frame`, the line that called the module in the real run.
        self.stop_code: types.CodeType | None = None
        self.outer_frame: tuple[types.CodeType, int] | None = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run inside are not recorded (nanscope's own bookkeeping between forward and backward)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def __torch_dispatch__(self, func: Any, types_: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        index = self.ops_seen
        self.ops_seen += 1
        if self._last_outputs is not None:
            self._map_nodes()
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
        name, kind, checked = _op_info(func)
        tensors = [t for t in _flat_out(out)[:checked] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not tensors:
            return out
        if kind == _VIEW and ins:
            # Autograd makes a view share its base's version counter once this returns.
            version = _version(in_tensors[0])
            outs = tuple(self._remember(t, ins[0], version) for t in tensors)
        elif kind == _UNINITIALIZED:
            outs = tuple(self._remember(t, self.ledger.new(OP), _version(t)) for t in tensors)
        else:
            # ADInplaceOrView bumps the version of a mutated tensor once this returns: expect that.
            outs = tuple(self._record(t, OP, bump=kind == _MUTATING and any(t is a for a in in_tensors))
                         for t in tensors)
            self._pending_bytes += sum(t.numel() * t.element_size() for t in tensors)
        if backward:
            node = torch._C._current_autograd_node()
            module = self._node_module.get(node) if node is not None else None
            frame = self._node_frame.get(node) if node is not None else None
            grad_fn = node.name() if node is not None else None
        else:
            stack = self.modules.stack
            module = stack[-1] if stack else None
            frame, grad_fn = self._user_frame(), None
            self._last_outputs = (module, frame, tensors)
        self._pending.append(Op(
            index=index, name=name, backward=backward, module=module, frame=frame, grad_fn=grad_fn,
            ins=tuple(ins), outs=outs, tensors=tuple(tensors), inf_scalar=inf_scalar,
        ))
        if len(self._pending) >= _FLUSH_OPS or self._pending_bytes >= _FLUSH_BYTES:
            self.flush()
        return out

    def flush(self) -> None:
        """Read the queued flags (one device->host copy per device and dtype), resolve the held ops."""
        with torch.no_grad():
            for recs, mins, maxs in self._queue.values():
                mm = torch.stack([torch.stack(mins), torch.stack(maxs)]).cpu()  # [2, n]
                nan = (torch.isnan(mm[0]) | torch.isnan(mm[1])).tolist()
                inf = (torch.isinf(mm[0]) | torch.isinf(mm[1])).tolist()
                for r, n, i in zip(recs, nan, inf):
                    self.ledger.set_flags(r, n, i)
        self._queue = {}
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for op in pending:
            self.ledger.resolve(op)

    def _map_nodes(self) -> None:
        """Autograd sets an output's grad_fn after dispatch returns: map the previous forward op's nodes."""
        module, frame, tensors = self._last_outputs  # type: ignore[misc]
        self._last_outputs = None
        for t in tensors:
            if t.requires_grad:
                node = t.grad_fn
                if node is not None and node not in self._node_module:
                    self._node_module[node] = module
                    self._node_frame[node] = frame

    def _input_record(self, t: torch.Tensor, backward: bool) -> int:
        known = self._known.get(id(t))
        version = _version(t)
        if known is not None and known[0]() is t:
            _, rec, expected = known
            if expected == version and version is not None:
                return rec
            return self._record(t, REFRESH, parent=rec)
        name, kind = self._sources.get(id(t), (None, PARAM))
        if backward or (name is None and t.numel() <= 1):
            kind = CONST  # backward: gradients and re-wrapped saved tensors; 0-dim: literals like tensor(-inf)
        if name is None:
            name = f"tensor {list(t.shape)} {str(t.dtype).removeprefix('torch.')} not made by a traced op"
        return self._record(t, kind, source=name)

    def _record(self, t: torch.Tensor, kind: int, *, bump: bool = False, source: str | None = None,
                parent: int | None = None) -> int:
        """A new record for `t`'s values, its min/max queued on `t`'s device."""
        rec = self.ledger.new(kind, source=source, parent=parent)
        if t.numel():
            # Inside __torch_dispatch__ autograd is already excluded: no graph, no no_grad() needed.
            mn, mx = torch.aminmax(_dense_flat(t))
            recs, mins, maxs = self._queue.setdefault((t.device, t.dtype), ([], [], []))
            recs.append(rec)
            mins.append(mn)
            maxs.append(mx)
        version = _version(t)
        return self._remember(t, rec, version + 1 if bump and version is not None else version)

    def _remember(self, t: torch.Tensor, rec: int, version: int | None) -> int:
        self._known[id(t)] = (weakref.ref(t), rec, version)
        return rec

    def _user_frame(self) -> tuple[types.CodeType, int] | None:
        return user_frame(self._internal, depth=2, stop=self.stop_code, at_stop=self.outer_frame)


class _ModuleStack:
    """Paths (from the root, "" is the root) of the modules whose forward is running.

    Global forward hooks, removed on exit; the post hook is `always_call`, so an exception inside a
    module keeps the stack right. Modules outside the root are named `<outside>.TypeName`.
    """

    def __init__(self, names: dict[int, str]) -> None:
        self._names = names
        self.stack: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "_ModuleStack":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [register_module_forward_pre_hook(self._enter_module),
                         register_module_forward_hook(self._leave_module, always_call=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.stack.clear()

    def _enter_module(self, mod: nn.Module, args: Any) -> None:
        name = self._names.get(id(mod))
        self.stack.append(name if name is not None else f"<outside>.{type(mod).__name__}")

    def _leave_module(self, mod: nn.Module, args: Any, out: Any) -> None:
        if self.stack:
            self.stack.pop()


_VIEW, _MUTATING, _UNINITIALIZED, _FUNCTIONAL = 0, 1, 2, 3
_UNINITIALIZED_OPS = frozenset({"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided",
                                "empty_permuted"})
# Ops whose trailing outputs are workspace, not values: attention kernels return a logsumexp padded
# with -inf (and seeds), CTC its log-alpha table, cuDNN RNNs a reserve buffer. Only the first n count.
_VALUE_OUTPUTS = {
    "_scaled_dot_product_efficient_attention": 1, "_scaled_dot_product_flash_attention": 1,
    "_scaled_dot_product_flash_attention_for_cpu": 1, "_scaled_dot_product_cudnn_attention": 1,
    "_scaled_dot_product_fused_attention_overrideable": 1, "_efficient_attention_forward": 1,
    "_flash_attention_forward": 1, "_ctc_loss": 1, "_cudnn_ctc_loss": 1, "_cudnn_rnn": 3,
}
_OP_INFO: dict[Any, tuple[str, int, int | None]] = {}


def _op_info(func: Any) -> tuple[str, int, int | None]:
    """`("aten.add_.Tensor", _MUTATING, None)`: the op's name, how its outputs relate to its inputs,
    and how many leading outputs hold values (None: all)."""
    info = _OP_INFO.get(func)
    if info is None:
        schema = getattr(func, "_schema", None)
        if getattr(func, "is_view", False):
            kind = _VIEW
        elif schema is not None and schema.is_mutable:
            kind = _MUTATING
        elif schema is not None and schema.name.split("::")[-1] in _UNINITIALIZED_OPS:
            kind = _UNINITIALIZED
        else:
            kind = _FUNCTIONAL
        base = schema.name.split("::")[-1] if schema is not None else ""
        info = _OP_INFO[func] = (str(func), kind, _VALUE_OUTPUTS.get(base))
    return info


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
