"""Silence transformers' progress bars around nanscope's own loads, restoring the previous state on exit.

transformers 5 draws a "Loading weights" bar on stderr in every `from_pretrained` (and "Writing model
shards" in `save_pretrained`), which would break the CLI's one-paragraph error output. Only the loads
nanscope makes are wrapped; a user's own loads, and their settings, are left as they were.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """No transformers progress bar inside the block; the previous settings are back on exit (also on errors).

    On 5.x this sets a tqdm hook (`transformers.utils.logging.set_tqdm_hook`, which returns the previous hook,
    restored exactly) that hands out transformers' own `EmptyTqdm`: only transformers' bars are affected, no
    global flag changes. 4.x has no hook: its switch (`disable_progress_bar`) is turned off only when it was on,
    and turned on again afterwards, with huggingface_hub's own switch put back to what it was.
    """
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is not None:
        previous = set_hook(lambda _factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs))
        try:
            yield
        finally:
            set_hook(previous)
        return
    if not hf_logging.is_progress_bar_enabled():
        yield
        return
    from huggingface_hub import utils as hub_utils

    hub_was_disabled = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        if hub_was_disabled:
            hub_utils.disable_progress_bars()
