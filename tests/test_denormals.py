"""verify-fix's training steps flush denormals (scoped): the mode is put back, also on exceptions, and the
losses equal the unflushed run's.

The mode is read independently of nanscope: a float32 denormal times 1.0 is 0 only while flushing.
"""

from __future__ import annotations

import pytest
import torch

from nanscope.verify.denormals import flush_denormals

DENORMAL = torch.full((8,), 1e-40, dtype=torch.float32)  # below float32's smallest normal, 1.18e-38


def _flushes() -> bool:
    return bool(((DENORMAL * 1.0) == 0).all())


@pytest.fixture(autouse=True)
def _mode_off():
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    yield
    torch.set_flush_denormal(False)


def test_flushes_inside_and_restores_the_previous_mode_also_on_exceptions() -> None:
    assert not _flushes()
    with flush_denormals() as on:
        assert on and _flushes()
    assert not _flushes()
    with pytest.raises(RuntimeError, match="boom"):
        with flush_denormals():
            assert _flushes()
            raise RuntimeError("boom")
    assert not _flushes()
    torch.set_flush_denormal(True)  # a caller that flushes already keeps flushing
    with flush_denormals():
        assert _flushes()
    assert _flushes()
    torch.set_flush_denormal(False)
    with flush_denormals(enabled=False):
        assert not _flushes()


def test_training_steps_match_the_unflushed_run(demo_replay) -> None:
    """Flushing changes values below 1.2e-38 only. A loss term is a sum of float32 values whose rounding is
    ~6e-8 relative to it, and AdamW turns a flushed 1e-39 gradient into an update of ~lr * 1e-31 instead of
    0: both are far below RTOL = 1e-5 (checks 4-6's tolerance), so the totals must agree to it at every step."""
    from nanscope.criterion.set_criterion import SetCriterion
    from nanscope.verify.checks import RTOL
    from nanscope.verify.pipeline import train_steps

    crit = SetCriterion("mmdet")
    extras = demo_replay.criterion_extras()
    flushed = train_steps(demo_replay, crit, "after", 3, extras=extras, flush=True)
    assert not _flushes()  # train_steps put the mode back
    plain = train_steps(demo_replay, crit, "after", 3, extras=extras, flush=False)
    assert flushed[1] is None and plain[1] is None
    assert flushed[0] == pytest.approx(plain[0], rel=RTOL)
    assert flushed[0][-1] != flushed[0][0]  # the steps trained (the comparison is not of three equal numbers)
