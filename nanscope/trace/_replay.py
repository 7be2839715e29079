"""Phase 2 of the origin trace: the op-level mode inside the module calls phase 1 flagged, replayed alone.

Each call runs again from the inputs phase 1 kept, with the generator states it started with (dropout draws
the same masks), under `NonfiniteMode`: module paths come from the root as in a full trace, and the user line
of an op that runs in torch's own module code (a `Linear`'s `addmm`) is the line that called the module in
the real run. The global generator states are restored afterwards.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from nanscope.trace._calls import Call, rng_states, set_rng_states
from nanscope.trace._mode import NonfiniteMode


def replay_calls(root: nn.Module, calls: Sequence[Call]) -> NonfiniteMode:
    """Replay `calls` (in this order) under one op-level mode; its ledger holds what they wrote."""
    mode = NonfiniteMode(root)
    mode.stop_code = _call.__code__
    saved = rng_states()
    try:
        with torch.enable_grad(), mode.modules, mode:
            for call in calls:
                if call.rng is not None:
                    set_rng_states(call.rng)
                mode.outer_frame = call.frame
                _call(call.module, call.args or (), call.kwargs or {})
    finally:
        set_rng_states(saved)
    mode.flush()
    return mode


def _call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return module(*args, **kwargs)

