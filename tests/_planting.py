"""Plant a cause in a prepared demo Replay's weights, and restore them: shared by the analyzer tests."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from nanscope.replay.session import Replay

NAN = float("nan")


@contextlib.contextmanager
def planted(replay: Replay, name: str, fn: Any) -> Iterator[None]:
    """Apply `fn` in place to parameter `name` of the model and of the checkpoint state dict (and its
    aliases: shared modules appear under several keys); restore both on exit."""
    param = dict(replay.model.named_parameters(remove_duplicate=False))[name]
    state = replay.state_dict[name]
    own = state.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()  # the model's tensor stands for it
    saved = param.detach().clone(), state.clone()
    try:
        with torch.no_grad():
            fn(param)
            if not own:
                fn(state)  # aliases share its storage (torch.save keeps sharing)
        yield
    finally:
        with torch.no_grad():
            param.copy_(saved[0])
            state.copy_(saved[1])


def set_nan(t: torch.Tensor) -> None:
    t.view(-1)[0] = NAN
