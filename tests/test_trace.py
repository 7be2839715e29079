"""nanscope.trace: the first non-finite op, forward and backward, on small modules and the real demo model."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from nanscope.errors import CriterionError
from nanscope.trace.tracer import TraceResult, trace_findings, trace_nonfinite


def _global_hook_counts() -> tuple[int, ...]:
    from torch.nn.modules import module as m

    return tuple(len(d) for d in (m._global_forward_pre_hooks, m._global_forward_hooks,
                                  m._global_backward_pre_hooks, m._global_backward_hooks))


def _module_hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules()) + sum(
        len(p._backward_hooks or {}) for p in model.parameters())


# ----------------------------------------------------------------------------- small modules


class _Contrastive(nn.Module):
    """groundingdino's ContrastiveEmbed pattern: masked_fill_(-inf) and a full(-inf) copied into."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        res = self.proj(x) @ text.transpose(-1, -2)  # [Q, T]
        res.masked_fill_(~mask[None, :], float("-inf"))
        new_res = torch.full((res.shape[0], 8), float("-inf"), device=res.device)  # [Q, 8]
        new_res[:, : res.shape[-1]] = res
        return new_res


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = _Contrastive()
        self.box = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(x, text, mask), "boxes": self.box(x)}


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_CUDA)])
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture()
def tiny(device) -> tuple[_Tiny, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return (_Tiny().to(device), torch.randn(3, 4, device=device), torch.randn(5, 4, device=device),
            torch.tensor([True, True, True, False, False], device=device))


def test_intentional_inf_is_recorded_not_blamed(tiny):
    model, x, text, mask = tiny

    def run() -> torch.Tensor:
        out = model(x, text, mask)
        logits = out["logits"]
        return torch.where(torch.isfinite(logits), logits, 0.0).sum() + out["boxes"].sum()

    r = trace_nonfinite(model, run)
    assert r.forward is None and r.backward is None and r.loss_finite and r.clean
    ops = {(s.module, s.op) for s in r.intentional_inf_sources}
    assert ("head", "aten.masked_fill_.Scalar") in ops
    assert ("head", "aten.full.default") in ops
    assert all(s.module_type == "_Contrastive" and s.frame.file == __file__ for s in r.intentional_inf_sources)


def test_nan_through_in_place_copy_blames_the_matmul_not_full(tiny):
    """The NaN made in `res` reaches `new_res` through a view + copy_: `full` must not look like an origin."""
    model, x, text, mask = tiny
    text = text.clone()
    text[1, 2] = float("nan")  # a batch tensor: enters at the matmul that reads it
    r = trace_nonfinite(model, lambda: model(x, text, mask)["logits"].sum())
    assert r.forward is not None and r.forward.kind == "nan"
    assert r.forward.op in ("aten.mm.default", "aten.matmul.default")
    assert r.forward.module == "head" and r.forward.source is not None and "not made by a traced op" in r.forward.source
    assert r.forward.nan_count == 3 and r.forward.first_indices[0] == (0, 1)
    assert r.forward.frame.file == __file__ and "self.proj(x) @ text" in _line(r.forward.frame)


def test_nan_parameter_enters_at_its_module(tiny):
    model, x, text, mask = tiny
    with torch.no_grad():
        model.box[0].weight[2, 1] = float("nan")
    r = trace_nonfinite(model, lambda: model(x, text, mask)["boxes"].sum())
    assert r.forward.module == "box.0" and r.forward.module_type == "Linear"
    assert r.forward.source == "parameter box.0.weight"
    assert r.forward.op == "aten.addmm.default"
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: .grad untouched


def test_nan_in_a_one_element_parameter_is_an_origin(device):
    """MMDetection's ContrastiveEmbed has a learnable 1-element bias: NaN there must not pass as a constant."""

    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.full((1,), float("nan")))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.bias

    model = nn.Sequential(nn.Linear(2, 2), Biased()).to(device)
    r = trace_nonfinite(model, lambda: model(torch.ones(1, 2, device=device)).sum())
    assert r.forward.module == "1" and r.forward.source == "parameter 1.bias" and r.forward.op == "aten.add.Tensor"


def test_inf_origin_and_backward_origin_in_a_module(device):
    class Act(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(torch.relu(x))  # finite; its backward is grad / (2 * sqrt(0)) = inf at x <= 0

    model = nn.Sequential(nn.Linear(3, 3), Act()).to(device)
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, -2.0, 0.5]], device=device)  # relu -> [1, 0, 0.5]
    # The inf is masked again by relu's backward inside the module: only the op-level trace of the whole
    # step sees it (docs/trace.md, "Not supported"; tests/test_trace_phases.py covers the two-phase side).
    r = trace_nonfinite(model, lambda: model(x).sum(), two_phase=False)
    assert r.forward is None and r.loss_finite
    assert r.backward is not None and r.backward.kind == "inf"
    assert r.backward.module == "1" and r.backward.module_type == "Act"
    assert r.backward.grad_fn == "SqrtBackward0"
    assert "torch.sqrt(torch.relu(x))" in _line(r.backward.frame)  # the forward line whose backward it is

    model2 = model[:1]
    r2 = trace_nonfinite(model2, lambda: torch.log(torch.relu(model2(x))).sum())  # log(0): inf origin
    assert r2.forward.kind == "inf" and r2.forward.op == "aten.log.default" and r2.forward.module is None
    assert not r2.loss_finite and r2.intentional_inf_sources == ()


def _anomaly_frame(run) -> tuple[str, int]:
    """detect_anomaly's own answer: the last frame of this file in the forward traceback it warns with."""
    import re
    import traceback

    with warnings.catch_warnings(record=True) as caught, torch.autograd.detect_anomaly(check_nan=True):
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="returned nan values"):
            run().backward()
    text = "\n".join(str(w.message) for w in caught) + "".join(traceback.format_stack(limit=0))
    frames = re.findall(r'File "([^"]+)", line (\d+)', text)
    file, line = [f for f in frames if f[0].endswith("test_trace.py")][-1]
    return file, int(line)


def test_backward_origin_in_user_loss_code_names_its_file_and_line():
    """NS302 in the user's criterion: the forward line whose backward made the first NaN, as detect_anomaly names it."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    x = torch.randn(2, 4)

    def run() -> torch.Tensor:
        pred = model(x)
        return (pred - pred.detach()).pow(2).sum().sqrt()  # forward 0; backward: sqrt'(0) = inf, then 0 * inf

    file, line = _anomaly_frame(run)
    model.zero_grad(set_to_none=True)
    r = trace_nonfinite(model, run)
    assert r.forward is None and r.backward is not None
    assert (r.backward.frame.file, r.backward.frame.line) == (file, line)
    f302 = next(f for f in trace_findings(r) if f.code == "NS302")
    assert f302.where[0]["file"].endswith("test_trace.py") and f302.where[0]["line"] == line


def test_attention_workspace_is_not_an_origin(device):
    """CUDA's efficient attention returns a logsumexp padded with -inf next to its output: not a value."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, batch_first=True).to(device)
    q, kv = torch.randn(2, 900, 32, device=device), torch.randn(2, 50, 32, device=device)
    r = trace_nonfinite(attn, lambda: attn(q, kv, kv, need_weights=False)[0].square().mean())
    assert r.clean and r.backward_traced


def _no_box_model(device: torch.device) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6)).to(device)  # 2 class logits + 4 box numbers
    x, labels = torch.randn(4, 8, device=device), torch.zeros(4, 2, device=device)  # a batch without objects
    has_box, target_boxes = torch.zeros(4, dtype=torch.bool, device=device), torch.zeros(0, 4, device=device)

    def run() -> torch.Tensor:
        out = model(x)
        loss_cls = F.binary_cross_entropy_with_logits(out[:, :2], labels)
        loss_box = (out[has_box, 2:] - target_boxes).abs().sum() / len(target_boxes)  # 0 / 0
        return loss_cls + loss_box

    return model, run


def test_nan_loss_with_finite_gradients_detect_anomaly_is_silent(device):
    model, run = _no_box_model(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.detect_anomaly(check_nan=True):
            loss = run()
            loss.backward()  # no error: every gradient is finite
    assert torch.isnan(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)

    r = trace_nonfinite(model, run)
    assert not r.loss_finite
    assert r.forward.op == "aten.div.Tensor" and r.forward.kind == "nan" and r.forward.module is None
    assert r.forward.frame.function == "run" and "len(target_boxes)" in _line(r.forward.frame)
    assert r.backward.grad_fn == "DivBackward0" and r.backward.kind == "inf"  # detect_anomaly ignores inf
    [f301, f302] = trace_findings(r)
    assert (f301.code, f302.code) == ("NS301", "NS302")
    assert f301.where[0]["op"] == "div" and f301.where[0]["file"].endswith("test_trace.py")
    assert f301.where[0]["line"] == r.forward.frame.line
    assert "in the loss code" in f301.message and "NaN first appears in the forward at div" in f301.message


def test_state_restored_when_run_raises(tiny):
    model, x, text, mask = tiny
    hooks, module_hooks = _global_hook_counts(), _module_hook_counts(model)

    def run() -> torch.Tensor:
        model(x, text, mask)
        raise KeyError("criterion failed")

    with torch.no_grad(), pytest.raises(KeyError, match="criterion failed"):
        trace_nonfinite(model, run)
        assert torch.is_grad_enabled() is False  # pragma: no cover
    assert torch._C._len_torch_dispatch_stack() == 0
    assert _global_hook_counts() == hooks and _module_hook_counts(model) == module_hooks
    assert torch.is_grad_enabled()
    assert trace_nonfinite(model, lambda: model(x, text, mask)["boxes"].sum()).clean  # usable again


def test_run_must_return_a_loss(tiny):
    model, x, text, mask = tiny
    with pytest.raises(CriterionError, match="run\\(\\) returned list"):
        trace_nonfinite(model, lambda: [model(x, text, mask)["boxes"].sum()])
    assert torch._C._len_torch_dispatch_stack() == 0


def test_loss_dict_terms_are_summed(tiny):
    model, x, text, mask = tiny
    nan = torch.tensor(float("nan"), device=x.device)
    r = trace_nonfinite(model, lambda: {"a": model(x, text, mask)["boxes"].sum(), "b": nan})
    assert not r.loss_finite and r.forward is None  # the NaN term was made before the trace: no op to blame
    assert trace_findings(r) == []


def _line(frame) -> str:
    import linecache

    return linecache.getline(frame.file, frame.line)


# ----------------------------------------------------------------------------- the real demo model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from nanscope.stacks.groundingdino.demo import demo_batch, write_demo
    from nanscope.stacks.groundingdino.stack import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared small CPU: one thread is faster and steadier than oversubscribing
    files = write_demo(tmp_path_factory.mktemp("demo"), long=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = build_model(files.config, text_encoder=files.text_encoder, seed=0)
    batch = demo_batch(0, long=False)
    yield model, batch["images"], batch["captions"]
    torch.set_num_threads(threads)


def naive_focal_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = out["pred_logits"]  # [B, 900, 256], -inf past each caption's tokens
    return sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="mean")  # NaN at -inf


def masked_focal_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = out["pred_logits"]
    valid = torch.isfinite(logits)  # the text mask, as the model applied it
    return sigmoid_focal_loss(torch.where(valid, logits, 0.0), torch.zeros_like(logits), reduction="mean")


@pytest.fixture(scope="module")
def naive_trace(demo) -> TraceResult:
    model, images, captions = demo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trace_nonfinite(model, lambda: naive_focal_loss(model(images, captions=captions)))


def test_demo_unmasked_focal_loss_origin_is_the_loss_line(naive_trace):
    r = naive_trace
    o = r.forward
    assert not r.loss_finite and o is not None and o.kind == "nan" and o.phase == "forward"
    assert "binary_cross_entropy" in o.op and o.module is None
    lines, start = inspect.getsourcelines(naive_focal_loss)
    assert o.frame.file == __file__ and o.frame.function == "naive_focal_loss"
    assert o.frame.line == start + next(i for i, s in enumerate(lines) if "sigmoid_focal_loss(" in s)
    assert o.shape == (2, 900, 256) and 0 < o.nan_count < 2 * 900 * 256
    assert o.inf_from is not None and o.inf_from.intentional
    assert o.inf_from.module == "transformer.decoder.class_embed.0" and o.inf_from.module_type == "ContrastiveEmbed"
    intentional = {(s.module, s.op) for s in r.intentional_inf_sources}
    assert ("transformer.decoder.class_embed.0", "aten.masked_fill_.Scalar") in intentional
    assert r.backward is None  # every NaN gradient comes from the NaN forward values
    [f] = trace_findings(r)
    assert f.code == "NS301" and "ContrastiveEmbed" in f.message and f.where[0]["module"] == "(loss code)"


def test_demo_nan_in_the_loss_code_is_named_without_tracing_the_model_op_by_op(demo, naive_trace):
    """The loss code runs under the op-level mode in phase 1 and the -inf it turned into NaN is followed back to the
    replayed ContrastiveEmbed call: the same answer as the op-level trace of the whole step, which is not run."""
    model, images, captions = demo
    assert naive_trace.full_trace_reason is None and naive_trace.module_calls > 0
    assert "transformer.decoder.class_embed.0" in naive_trace.replayed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = trace_nonfinite(model, lambda: naive_focal_loss(model(images, captions=captions)), two_phase=False)

    def key(o):
        return (o.phase, o.op, o.module, o.kind, o.nan_count, o.inf_count, o.shape, o.first_indices, o.source,
                o.grad_fn, o.frame, (o.inf_from.op, o.inf_from.module, o.inf_from.frame, o.inf_from.intentional)
                if o.inf_from else None)

    assert [key(o) for o in naive_trace.origins] == [key(o) for o in full.origins]
    # the -inf that reaches a module output; attention masks softmaxed away inside a call are seen op by op only
    quick_sources = {(s.op, s.module, s.frame) for s in naive_trace.intentional_inf_sources}
    assert quick_sources <= {(s.op, s.module, s.frame) for s in full.intentional_inf_sources}
    assert {m for _, m, _ in quick_sources} == {"transformer.decoder.class_embed.0", "transformer.enc_out_class_embed"}
    assert naive_trace.ops_seen < full.ops_seen / 4


def test_demo_detect_anomaly_blames_a_downstream_backward_node(demo, naive_trace):
    """Side by side: detect_anomaly names torchvision's `ce_loss * (1 - p_t) ** gamma` backward;
    nanscope names the BCE in the user's loss and the -inf the model wrote."""
    model, images, captions = demo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.detect_anomaly(check_nan=True), pytest.raises(RuntimeError) as err:
            naive_focal_loss(model(images, captions=captions)).backward()
    model.zero_grad(set_to_none=True)
    assert "MulBackward0" in str(err.value) and "binary_cross_entropy" not in str(err.value).lower()
    assert "binary_cross_entropy" in naive_trace.forward.op and naive_trace.forward.phase == "forward"


def test_demo_nan_parameter_names_its_module(demo):
    model, images, captions = demo
    name = "transformer.decoder.layers.0.ca_text.in_proj_weight"
    p = model.get_parameter(name)
    saved = p.detach().clone()
    with torch.no_grad():
        p[3, 5] = float("nan")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = trace_nonfinite(model, lambda: masked_focal_loss(model(images, captions=captions)), backward=False)
    finally:
        with torch.no_grad():
            p.copy_(saved)
    assert r.forward is not None and r.forward.kind == "nan"
    assert r.forward.module == name.rsplit(".", 1)[0] and r.forward.module_type == "MultiheadAttention"
    assert r.forward.source == f"parameter {name}"
    assert r.backward is None and not r.backward_traced


def test_demo_masked_loss_is_clean(demo):
    model, images, captions = demo
    hooks, module_hooks = _global_hook_counts(), _module_hook_counts(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = trace_nonfinite(model, lambda: {"loss_ce": masked_focal_loss(out := model(images, captions=captions)),
                                            "loss_bbox": out["pred_boxes"].abs().mean()})
    assert r.loss_finite and r.forward is None and r.backward is None and r.origins == () and r.backward_traced
    assert r.full_trace_reason is None and r.module_calls == _count_calls(model, images, captions)
    assert trace_findings(r) == []
    assert {s.module for s in r.intentional_inf_sources} >= {"transformer.decoder.class_embed.0",
                                                             "transformer.enc_out_class_embed"}
    assert torch._C._len_torch_dispatch_stack() == 0
    assert _global_hook_counts() == hooks and _module_hook_counts(model) == module_hooks
    assert all(p.grad is None for p in model.parameters())


def _count_calls(model: nn.Module, images: torch.Tensor, captions: list[str]) -> int:
    """Calls of the model's modules in one plain forward, counted by a hook of the test's own."""
    from torch.nn.modules.module import register_module_forward_hook

    ours = {id(m) for m in model.modules()}
    seen = []
    handle = register_module_forward_hook(lambda m, a, o: seen.append(id(m) in ours))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(images, captions=captions)
    finally:
        handle.remove()
    return sum(seen)
