"""module_stats: per-module max |activation| against a hand computation, order, non-finite counts, and
hooks that are gone after the block, also when the forward raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nanscope.replay.module_stats import FP16_MAX, half_limit, module_stats


class Masked(nn.Module):
    """Writes -inf on purpose, as ContrastiveEmbed does; returns a tuple with a non-float tensor."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.masked_fill(x < 0, float("-inf")), torch.ones(2, dtype=torch.long)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.ReLU(), nn.Linear(6, 3)))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_max_abs_equals_hand_computation_and_order_is_completion_order():
    model = _model()
    x = torch.randn(5, 4)
    with torch.no_grad(), module_stats(model) as stats:
        model(x)
        model(2 * x)  # a second call: the running max keeps the larger one
    rows = {r.name: r for r in stats.result()}
    with torch.no_grad():
        h = model[0](2 * x)
        expected = {"0": h, "1.0": torch.relu(h), "1.1": model[1][1](torch.relu(h))}
    expected["1"] = expected["1.1"]
    expected[""] = expected["1.1"]
    for name, out in expected.items():
        assert rows[name].max_abs == pytest.approx(float(out.abs().max()), rel=1e-6)
        assert rows[name].calls == 2 and rows[name].nonfinite == 0 and rows[name].dtype == "torch.float32"
    assert [r.name for r in stats.result()] == ["0", "1.0", "1.1", "1", ""]


def test_infinities_are_counted_not_maxed_and_non_float_outputs_ignored():
    model = nn.Sequential(Masked())
    x = torch.tensor([[-1.0, 3.0, -2.0, 0.5]])
    with module_stats(model) as stats:
        model(x)
    (row,) = [r for r in stats.result() if r.name == "0"]
    assert row.max_abs == 3.0 and row.nonfinite == 2 and row.new_nonfinite == 0  # inputs not checked


def test_check_inputs_marks_where_non_finite_values_start():
    model = nn.Sequential(nn.Linear(3, 3), Masked(), nn.Sequential(nn.Identity()))
    with torch.no_grad():
        model[0].weight.copy_(-torch.eye(3))
        model[0].bias.zero_()
    with module_stats(model, check_inputs=True) as stats:
        model(torch.ones(2, 3))
    rows = {r.name: r for r in stats.result()}
    assert rows["1"].new_nonfinite == 1 and rows["1"].nonfinite == 6
    assert rows["0"].new_nonfinite == 0  # finite output
    assert rows["2.0"].nonfinite == 6 and rows["2.0"].new_nonfinite == 0  # inherited, not started


def test_hooks_removed_on_exit_and_on_exception():
    model = _model()
    with module_stats(model):
        assert _hooks(model) == 5
    assert _hooks(model) == 0
    with pytest.raises(RuntimeError), module_stats(model):
        model(torch.randn(2, 5))  # wrong width
    assert _hooks(model) == 0


def test_non_finite_outputs_are_read_in_chunks_and_keep_no_tensors(monkeypatch):
    from nanscope.replay import module_stats as ms

    monkeypatch.setattr(ms, "_CHUNK", 7)  # several chunks, the last one short
    y = torch.randn(5, 9)
    y[0, 3], y[4, 8], y[2, 2] = float("nan"), float("inf"), float("-inf")
    m = nn.Identity()
    with module_stats(m) as s:
        m(y)
    (row,) = s.result()
    finite = torch.isfinite(y)
    assert row.nonfinite == int((~finite).sum()) == 3
    assert row.max_abs == pytest.approx(float(y[finite].abs().max()))
    assert not any(isinstance(v, torch.Tensor) for d in (s._max, s._bad) for v in d.values())  # CPU: Python numbers


def test_empty_result_and_limits():
    with module_stats(nn.Identity()) as stats:
        pass
    assert stats.result() == []
    assert half_limit(None, 4.0) == half_limit(torch.float16, 4.0) == FP16_MAX / 4 == 16376.0
    assert half_limit(torch.bfloat16, 4.0) > 1e37


def test_outputs_handed_on_unchanged_are_reduced_once_and_permuted_ones_read_right(monkeypatch):
    from nanscope.replay import module_stats as ms

    reduced = []
    real = ms._max_and_bad
    monkeypatch.setattr(ms, "_max_and_bad", lambda t: reduced.append(t.shape) or real(t))
    model = nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.Dropout(0.5).eval())
    x = torch.randn(3, 4)
    with torch.no_grad(), module_stats(model) as stats:
        model(x)
    rows = {r.name: r for r in stats.result()}
    with torch.no_grad():
        expected = float(model[0](x).abs().max())
    assert {n: r.max_abs for n, r in rows.items()} == pytest.approx({"0": expected, "1": expected, "2": expected,
                                                                   "": expected}, rel=1e-6)
    assert reduced == [(3, 6)]  # one reduction, shared by the modules handing it on
    # A permuted output (dense in memory, not contiguous) and one with a gap both give the same max.
    t = torch.randn(2, 3, 5).permute(2, 0, 1)
    gap = torch.randn(4, 8)[:, ::2]
    for y in (t, gap):
        assert stats_max(y) == pytest.approx(float(y.abs().max()))


def stats_max(y: torch.Tensor) -> float:
    m = nn.Identity()
    with module_stats(m) as s:
        m(y)
    (row,) = s.result()
    return row.max_abs
