"""Phase 2 of the origin trace: the op-level mode inside the module calls phase 1 flagged, replayed alone.

Each call runs again from the inputs phase 1 kept, with the generator states it started with (dropout draws
the same masks), under `NonfiniteMode`: module paths come from the root as in a full trace, and the user line
of an op that runs in torch's own module code (a `Linear`'s `addmm`) is the line that called the module in
the real run. The global generator states are restored afterwards.

`replay_calls` replays forwards; `replay_backward` replays one call's forward from its inputs made into leaves
that require grad (those that required grad in the real run), then its backward from the gradients phase 1 saw
arrive at its outputs, so the backward ops are named by the forward op (module, line) that made their node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map

from nanscope.trace._calls import Call, _floats, rng_states, set_rng_states
from nanscope.trace._mode import NonfiniteMode


@dataclass
class Replayed:
    """What `replay_calls` ran: the mode (its ledger), each call's output records and where its ops start."""

    mode: NonfiniteMode
    outs: dict[int, list[int]] = field(default_factory=dict)  # call.seq -> ledger record per floating output (-1)
    starts: list[tuple[int, Call]] = field(default_factory=list)  # (index of its first op, call), in order

    def call_of(self, index: int) -> Call:
        """The replayed call that ran op `index`."""
        return [c for start, c in self.starts if start <= index][-1]


def replay_calls(root: nn.Module, calls: Sequence[Call]) -> Replayed:
    """Replay `calls` (in this order) under one op-level mode."""
    done = Replayed(_mode(root))
    mode = done.mode
    saved = rng_states()
    try:
        with torch.enable_grad(), mode.modules, mode:
            for call in calls:
                if call.rng is not None:
                    set_rng_states(call.rng)
                mode.outer_frame = call.frame
                done.starts.append((mode.ops_seen, call))
                out = _call(call.module, call.args or (), call.kwargs or {})
                done.outs[call.seq] = [mode._known.get(id(t), (None, -1))[1] for t in _floats(out)]
    finally:
        set_rng_states(saved)
    mode.flush()
    return done


def replay_backward(root: nn.Module, call: Call) -> tuple[NonfiniteMode, set[str]]:
    """`call`'s forward and, from the gradients saved at its outputs, its backward under one op-level mode; and
    which of "nan", "inf" the gradients it computed (at its inputs and parameters) hold."""
    mode = _mode(root)
    mode.outer_frame = call.frame
    leaves: list[torch.Tensor] = []

    def leaf(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            x = x.detach().requires_grad_()
            leaves.append(x)
        return x

    args, kwargs = tree_map(leaf, (call.args or (), call.kwargs or {}))
    params = [p for p in call.module.parameters() if p.requires_grad]
    saved = rng_states()
    grads: tuple[torch.Tensor | None, ...] = ()
    try:
        with torch.enable_grad(), mode.modules, mode:
            if call.rng is not None:
                set_rng_states(call.rng)
            outs = _floats(_call(call.module, args, kwargs))
            pairs = [(outs[i], g) for i, (_, g) in sorted(call.gouts.items())
                     if g is not None and i < len(outs) and outs[i].requires_grad]
            if pairs and (leaves or params):
                grads = torch.autograd.grad([o for o, _ in pairs], leaves + params,
                                            grad_outputs=[g for _, g in pairs], allow_unused=True)
    finally:
        set_rng_states(saved)
    mode.flush()
    made = set()
    with torch.no_grad():
        for g in grads:
            if g is not None and g.is_floating_point():
                made |= {"nan"} if bool(torch.isnan(g).any()) else set()
                made |= {"inf"} if bool(torch.isinf(g).any()) else set()
    return mode, made


def _mode(root: nn.Module) -> NonfiniteMode:
    mode = NonfiniteMode(root)
    mode.stop_code = _call.__code__
    return mode


def _call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return module(*args, **kwargs)
