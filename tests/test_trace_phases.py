"""The two-phase trace (module-level flags, then the op-level mode inside the flagged calls only) names what the
op-level trace of the whole step names, replays dropout with the same masks, and falls back where a replay
cannot be trusted."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanscope.trace.tracer import trace_nonfinite


class _Overflow(nn.Module):
    """exp of a large activation overflows to inf; inf - inf is NaN: both start inside this module."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        e = torch.exp(h * 100.0)
        return e - e


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.block = _Overflow()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(torch.relu(self.inp(x))))


class _Masked(nn.Module):
    """ContrastiveEmbed's pattern: -inf written on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(x).masked_fill(~mask, float("-inf"))


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.masked = _Masked()
        self.box = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.masked(x, mask), "boxes": self.box(x)}


def _key(o) -> tuple:
    return (o.phase, o.op, o.module, o.module_type, o.kind, o.nan_count, o.inf_count, o.shape, o.first_indices,
            o.source, (o.frame.file, o.frame.line) if o.frame else None)


def _both(model: nn.Module, run, **kw):
    quick = trace_nonfinite(model, run, **kw)
    full = trace_nonfinite(model, run, two_phase=False, **kw)
    assert full.full_trace_reason is not None and full.module_calls == 0
    return quick, full


def test_overflow_inside_a_module_is_named_from_its_replay_alone():
    torch.manual_seed(0)
    model = _Net()
    with torch.no_grad():
        model.block.lin.weight.fill_(1.0)
    x = torch.ones(2, 4)
    quick, full = _both(model, lambda: model(x).sum(), backward=False)
    assert quick.full_trace_reason is None and quick.replayed == ("block",)
    assert [_key(o) for o in quick.origins] == [_key(o) for o in full.origins]
    assert {(o.kind, o.op, o.module) for o in quick.origins} == {("inf", "aten.exp.default", "block"),
                                                                ("nan", "aten.sub.Tensor", "block")}
    assert quick.forward.frame.function == "forward" and quick.forward.frame.file == __file__
    assert quick.ops_seen < full.ops_seen


@pytest.mark.parametrize("backward", [False, True])
def test_a_nan_parameter_in_a_torch_module_names_the_line_that_called_it(backward):
    """With the backward: the NaN gradients come from the NaN forward (the loss code sends them in), not from
    an origin in the backward, and nothing is traced again."""
    torch.manual_seed(0)
    model = _Net()
    with torch.no_grad():
        model.block.lin.weight.fill_(0.01)
        model.out.weight[1, 2] = float("nan")
    x = torch.ones(2, 4)
    quick, full = _both(model, lambda: model(x).sum(), backward=backward)
    assert quick.full_trace_reason is None and quick.replayed == ("out",) and quick.replayed_backward == ()
    assert [_key(o) for o in quick.origins] == [_key(o) for o in full.origins]
    assert quick.backward_traced == full.backward_traced == backward
    assert quick.forward.source == "parameter out.weight" and quick.forward.op == "aten.addmm.default"
    assert "self.out(self.block" in _line(quick.forward.frame)  # nn.Linear's caller, as in the real run


def test_intentional_inf_sources_match_and_the_backward_is_checked():
    torch.manual_seed(0)
    model = _Head()
    x, mask = torch.randn(3, 4), torch.tensor([True, True, False, False])

    def run() -> torch.Tensor:
        out = model(x, mask)
        return torch.where(torch.isfinite(out["logits"]), out["logits"], 0.0).sum() + out["boxes"].sum()

    quick, full = _both(model, run)
    assert quick.full_trace_reason is None and quick.replayed == ("masked",) and quick.backward_traced
    assert quick.clean and full.clean
    assert [(s.op, s.module, s.frame) for s in quick.intentional_inf_sources] == \
        [(s.op, s.module, s.frame) for s in full.intentional_inf_sources]
    assert all(p.grad is None for p in model.parameters())


class _Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.drop(x))  # log(0) = -inf where dropout zeroed


def test_the_replay_draws_the_same_dropout_masks_and_leaves_the_generator_as_one_run_would():
    model = nn.Sequential(nn.Identity(), _Dropped()).train()
    x = torch.ones(4, 64)
    torch.manual_seed(7)
    dropped = int((model(x) == float("-inf")).sum())  # the masks a plain run draws
    after_plain = torch.random.get_rng_state()
    torch.manual_seed(7)
    r = trace_nonfinite(model, lambda: model(x).sum(), backward=False)
    assert r.full_trace_reason is None and r.replayed == ("1",)
    assert r.forward.kind == "inf" and r.forward.op == "aten.log.default" and r.forward.inf_count == dropped
    assert torch.equal(torch.random.get_rng_state(), after_plain)


class _InPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(x).div_(0.0)  # 0 / 0 written into its own input


def test_a_module_that_changes_its_input_in_place_is_traced_op_by_op():
    model = nn.Sequential(nn.Linear(3, 3), _InPlace())
    r = trace_nonfinite(model, lambda: model(torch.ones(2, 3)).sum(), backward=False)
    assert r.full_trace_reason is not None and "in place" in r.full_trace_reason
    assert r.forward.module == "1" and r.forward.op.startswith("aten.div_.") and r.forward.nan_count == 6


def test_nan_in_the_loss_code_is_named_in_phase_1_and_leaves_nothing_on():
    """The loss code runs under the op-level mode in the one real run: its NaN (forward) and its backward's inf and
    NaN are named as the op-level trace of the whole step names them, with no second run."""
    from torch.nn.modules import module as m

    model = nn.Linear(3, 2)
    hooks = tuple(len(d) for d in (m._global_forward_pre_hooks, m._global_forward_hooks))
    quick, full = _both(model, lambda: (model(torch.ones(1, 3)) * 0).sum() / 0)
    assert quick.full_trace_reason is None and quick.module_calls == 1 and quick.replayed_backward == ()
    assert quick.forward.op == "aten.div.Tensor" and quick.forward.module is None
    assert [_key(o) for o in quick.origins] == [_key(o) for o in full.origins]
    assert {(o.phase, o.kind, o.grad_fn) for o in full.origins} == {
        ("forward", "nan", None), ("backward", "inf", "DivBackward0"), ("backward", "nan", "MulBackward0")}
    assert torch._C._len_torch_dispatch_stack() == 0
    assert tuple(len(d) for d in (m._global_forward_pre_hooks, m._global_forward_hooks)) == hooks
    assert all(p.grad is None for p in model.parameters())


class _Criterion(nn.Module):
    """A criterion module outside the model: named `<outside>._Criterion` by both traces."""

    def forward(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        logits = out["logits"]
        return F.binary_cross_entropy_with_logits(logits, target) + out["boxes"].abs().mean()


def test_the_loss_code_names_the_inf_the_model_wrote_on_purpose():
    """BCE on the -inf a module wrote: NaN in the loss code, made from the module's masked_fill (found by walking the
    autograd graph from the model output to the replayed call), as in the op-level trace of the whole step."""
    torch.manual_seed(0)
    model = _Head()
    x, mask = torch.randn(3, 4), torch.tensor([True, True, False, False])
    crit = _Criterion()
    quick, full = _both(model, lambda: crit(model(x, mask), torch.zeros(3, 4)))
    assert quick.full_trace_reason is None and quick.replayed == ("masked",)
    assert [_key(o) for o in quick.origins] == [_key(o) for o in full.origins]
    assert quick.forward.module == "<outside>._Criterion" and "binary_cross_entropy" in quick.forward.op
    assert (quick.forward.inf_from.op, quick.forward.inf_from.module, quick.forward.inf_from.frame) == \
        (full.forward.inf_from.op, full.forward.inf_from.module, full.forward.inf_from.frame)
    assert quick.forward.inf_from.op == "aten.masked_fill.Scalar" and quick.forward.inf_from.intentional
    assert quick.ops_seen < full.ops_seen


def _line(frame) -> str:
    import linecache

    return linecache.getline(frame.file, frame.line)


class _Sqrt(nn.Module):
    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.relu(x) if self.relu else x)  # sqrt'(0) = inf in the backward


@pytest.mark.parametrize("relu", [False, True])
def test_a_backward_inf_is_named_once_it_reaches_a_module_output(relu):
    """Without relu the inf gradient reaches the Linear's output: phase 1 sees it there and the backward of the call
    that read it (`_Sqrt`) is replayed alone. With relu it is masked again inside `_Sqrt`'s backward, reaches no
    gradient that training uses, and phase 1 (module granularity) does not see it; `two_phase=False` does."""
    model = nn.Sequential(nn.Linear(3, 3), _Sqrt(relu))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, -2.0 if relu else 0.0, 0.5]])
    r, full = _both(model, lambda: model(x).sum())
    assert full.backward.grad_fn == "SqrtBackward0" and full.backward.module == "1" and full.backward.kind == "inf"
    assert r.full_trace_reason is None
    if relu:
        assert r.clean and r.replayed_backward == ()
    else:
        # inf made by sqrt's backward in `_Sqrt`, then inf * 0 = NaN in the Linear's backward: two replays
        assert r.replayed_backward == ("1", "0")
        assert [_key(o) for o in r.origins] == [_key(o) for o in full.origins]
        assert "torch.sqrt(" in _line(r.backward.frame)


class _ZeroSafe(nn.Module):
    """Forward finite everywhere; the backward of `op` at zero is not: a hand-written norm (sqrt'(0) = inf, then
    inf * 0 = NaN), pow(x, 0.5)'(0) = inf, and a custom Function whose backward divides by its input.
    (`torch.linalg.vector_norm` is not one: its backward masks its own 0/0.)"""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.scale = nn.Linear(1, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.op == "norm":
            s = torch.sqrt((h * h).sum(-1, keepdim=True))
        elif self.op == "pow":
            s = h.pow(0.5).sum(-1, keepdim=True)
        else:
            s = _Reciprocal.apply(h).sum(-1, keepdim=True)
        return self.scale(s)


class _Reciprocal(torch.autograd.Function):
    """x -> x * 2 in the forward; a backward that divides by x (inf at zero)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad / x


@pytest.mark.parametrize("op", ["norm", "pow", "function"])
def test_a_nan_that_starts_in_one_modules_backward_is_named_from_its_backward_replay(op):
    """The backward of `mid` makes the first non-finite gradient (at the output of `inp`): phase 1 sees it there,
    the replay of `mid`'s forward and backward alone names op, module and line as the whole-step trace does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), _ZeroSafe(op), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.zero_()
    x = torch.randn(5, 3).abs()
    x[0] = 0.0  # h[0] = 0: the zero where the backward of `op` is not finite

    def run() -> torch.Tensor:
        return model(x).square().mean()

    quick, full = _both(model, run)
    assert quick.forward is None and full.forward is None and quick.loss_finite
    assert full.backward is not None and full.backward.module == "1"
    assert quick.full_trace_reason is None and quick.replayed_backward[0] == "1"  # then "0" for inf * 0 = NaN
    assert [_key(o) for o in quick.origins] == [_key(o) for o in full.origins]
    assert quick.backward.grad_fn == full.backward.grad_fn and quick.backward.frame.file == __file__
    assert quick.ops_seen < full.ops_seen
    if full.backward.kind == "nan":  # detect_anomaly names the same autograd node
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly(check_nan=True), pytest.raises(RuntimeError) as err:
                run().backward()
        model.zero_grad(set_to_none=True)
        assert full.backward.grad_fn in str(err.value)


def test_an_interrupt_inside_a_module_leaves_no_mode_and_no_hook():
    """A BaseException skips torch's always-called hooks: the phase-1 mode taken off the stack must still go."""
    from torch.nn.modules import module as m

    class Stop(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise KeyboardInterrupt

    model = nn.Sequential(nn.Linear(2, 2), Stop())
    hooks = tuple(len(d) for d in (m._global_forward_pre_hooks, m._global_forward_hooks))
    with pytest.raises(KeyboardInterrupt):
        trace_nonfinite(model, lambda: model(torch.ones(1, 2)).sum())
    assert torch._C._len_torch_dispatch_stack() == 0
    assert tuple(len(d) for d in (m._global_forward_pre_hooks, m._global_forward_hooks)) == hooks


class _Stash(nn.Module):
    """Keeps an intermediate on itself (as some models keep attention maps): the loss reads it, no module returned it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        self.kept = torch.log(h - h.detach() - 1.0)  # log(-1) = NaN, made by an inline op of this module
        return h


def test_a_nan_the_loss_reads_from_a_tensor_no_module_returned_is_traced_op_by_op():
    torch.manual_seed(0)
    model = _Stash()
    x = torch.randn(2, 3)

    def run() -> torch.Tensor:
        return model(x).sum() + model.kept.sum()

    quick, full = _both(model, run, backward=False)
    assert quick.full_trace_reason == "the loss code read a non-finite tensor that the run made but no module returned"
    assert quick.forward.module == "" and quick.forward.op == "aten.log.default"
    assert [_key(o) for o in quick.origins] == [_key(o) for o in full.origins]


class _Gate(nn.Module):
    """The first non-finite gradient is a parameter's: sqrt'(0) = inf for `gate` at 0, and the input is detached."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.tensor([0.0, 1.0, 4.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() * self.gate.sqrt()


def test_a_parameter_gradient_made_non_finite_is_named_from_its_modules_backward_replay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), _Gate(), nn.Linear(3, 1))
    x = torch.randn(4, 3)
    quick, full = _both(model, lambda: model(x).sum())
    assert full.backward is not None and full.backward.module == "1" and full.backward.grad_fn == "SqrtBackward0"
    assert quick.full_trace_reason is None and quick.replayed_backward == ("1",)
    assert [_key(o) for o in quick.origins] == [_key(o) for o in full.origins]
