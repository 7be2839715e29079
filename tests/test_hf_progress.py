"""quiet_progress_bars: no transformers progress bar inside, the user's settings exactly as before after."""

from __future__ import annotations

import pytest
from huggingface_hub import utils as hub_utils
from transformers.utils import logging as hf_logging

from nanscope.stacks._hf_progress import quiet_progress_bars


def settings() -> tuple[bool, bool]:
    return hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()


def test_bars_are_empty_inside_and_settings_are_restored_also_on_errors() -> None:
    before = settings()
    with quiet_progress_bars():
        bar = hf_logging.tqdm(range(3), desc="Loading weights")  # what from_pretrained creates
        assert isinstance(bar, hf_logging.EmptyTqdm)
        assert list(bar) == [0, 1, 2]  # still iterates
    assert settings() == before
    with pytest.raises(RuntimeError), quiet_progress_bars():
        raise RuntimeError("load failed")
    assert settings() == before
    if before[0]:
        assert not isinstance(hf_logging.tqdm(range(1), disable=True), hf_logging.EmptyTqdm)  # real bars again


def test_bars_the_user_switched_off_stay_off() -> None:
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with quiet_progress_bars():
            pass
        assert not hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


@pytest.mark.skipif(not hasattr(hf_logging, "set_tqdm_hook"), reason="transformers 4.x has no tqdm hook")
def test_the_users_tqdm_hook_is_back_after_the_block() -> None:
    calls: list[str] = []

    def hook(factory, args, kwargs):
        calls.append(kwargs.get("desc", ""))
        return factory(*args, **{**kwargs, "disable": True})

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        with quiet_progress_bars():
            hf_logging.tqdm(range(1), desc="inside")
        hf_logging.tqdm(range(1), desc="after")
        assert calls == ["after"]
    finally:
        hf_logging.set_tqdm_hook(previous)
