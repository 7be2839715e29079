"""nanscope.watch.attach: the sentinel on a criterion's or a model's returned loss terms, in loops nanscope does not own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

import nanscope
import nanscope.watch
from nanscope.cli import main
from nanscope.errors import InputError
from nanscope.replay.batch import validate_batch
from nanscope.replay.positive_map import build_text_info
from nanscope.stacks.groundingdino.demo import demo_batch
from nanscope.stacks.groundingdino.stack import build_model
from nanscope.watch.report import NonFiniteStepError

CRITERIA = str(Path(__file__).parents[1] / "fixtures" / "criteria" / "simple.py")
PLANT = 1  # the step whose image 1 gets a NaN pixel


def masked_terms(out: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
    """Focal loss on the valid text columns (the -inf padding replaced), L1 on the first queries."""
    logits = out["pred_logits"]  # [B, Q, 256]
    valid = logits != float("-inf")
    safe = torch.where(valid, logits, torch.zeros((), dtype=logits.dtype))
    t = torch.zeros_like(safe)
    for i, tg in enumerate(targets):
        t[i, : len(tg["boxes"])] = (tg["positive_map"] > 0).to(t.dtype)
    n = max(sum(len(tg["boxes"]) for tg in targets), 1)
    loss_ce = (sigmoid_focal_loss(safe, t, reduction="none") * valid).sum() / n
    loss_bbox = sum((out["pred_boxes"][i, : len(tg["boxes"])] - tg["boxes"]).abs().sum()
                    for i, tg in enumerate(targets)) / n
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox}


class Criterion(nn.Module):
    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        return masked_terms(outputs, targets)


@pytest.fixture()
def model(demo_files):
    m, _ = build_model(demo_files.config, text_encoder=demo_files.text_encoder, seed=0)
    m.load_state_dict(torch.load(demo_files.checkpoint, weights_only=True)["model"])
    return m.train()


def step_inputs(model, step: int, plant: int | None = PLANT):
    raw = demo_batch(step, long=False)
    if step == plant:
        raw["images"][1, 2, 10, 20] = float("nan")  # a corrupt pixel in image 1, channel 2
    b = validate_batch(raw)
    texts = build_text_info(model.tokenizer, b)
    targets = [{"boxes": t.boxes, "positive_map": ti.positive_map} for t, ti in zip(b.targets, texts)]
    return b, targets


def train(model, criterion, opt, steps: int = 3, plant: int | None = PLANT) -> list[int]:
    """A loop nanscope has no place in; returns the steps whose update was applied (weights changed)."""
    applied = []
    for step in range(steps):
        b, targets = step_inputs(model, step, plant)
        terms = criterion(model(b.images, captions=list(b.captions)), targets)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        if any(not torch.equal(a, p) for a, p in zip(before, model.parameters())):
            applied.append(step)
    return applied


def test_criterion_module_stops_before_backward_and_the_dump_replays_to_the_cause(model, demo_files, tmp_path,
                                                                                  capsys):
    crit = Criterion()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    dumps = tmp_path / "dumps"
    hooks_before = (len(model._forward_pre_hooks), len(crit._forward_hooks))
    with pytest.raises(NonFiniteStepError) as info:
        with nanscope.watch.attach(crit, dumps, model=model, config=demo_files.config,
                                   text_encoder=demo_files.text_encoder):
            train(model, crit, opt, steps=2)
    rep = info.value.report
    assert rep.step == PLANT and set(rep.nonfinite_terms) == {"loss_ce", "loss_bbox"}
    assert (len(model._forward_pre_hooks), len(crit._forward_hooks)) == hooks_before  # every hook removed
    manifest = json.loads((rep.dump / "manifest.json").read_text())
    assert manifest["step"] == PLANT and manifest["criterion"].endswith(":Criterion")
    batch = torch.load(rep.dump / "batch.pt", weights_only=True)
    assert torch.isnan(batch["images"][1, 2, 10, 20]) and batch["captions"] == demo_batch(PLANT, long=False)["captions"]
    assert "positive_map" in batch["targets"][0]  # the criterion's targets came with the dump

    out = tmp_path / "r.json"
    assert main(["inspect", str(rep.dump), "--criterion", f"{CRITERIA}:masked", "--json", str(out)]) == 1
    capsys.readouterr()
    first = json.loads(out.read_text())["findings"][0]
    assert first["code"] == "NS304" and {"image": 1, "channel": 2}.items() <= first["where"][0].items()


def test_healthy_run_no_alarm_and_detach_removes_every_hook(model, tmp_path):
    crit = Criterion()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    a = nanscope.watch.attach(crit, tmp_path / "d", model=model)
    assert train(model, crit, opt, steps=2, plant=None) == [0, 1]
    rep = a.detach()
    assert rep.steps_checked == 2 and rep.nonfinite_steps == () and rep.verdict is None
    assert not crit._forward_hooks and not model._forward_pre_hooks and not (tmp_path / "d").exists()
    crit(*[{"pred_logits": torch.full((1, 1, 4), float("nan")), "pred_boxes": torch.zeros(1, 1, 4)}],
         [{"boxes": torch.zeros(1, 4), "positive_map": torch.ones(1, 4)}])  # detached: no check, no raise


def test_skip_drops_exactly_the_bad_step_and_counts_it(model, tmp_path):
    crit = Criterion()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    with nanscope.watch.attach(crit, tmp_path / "d", model=model, optimizer=opt, on_nonfinite="skip") as a:
        applied = train(model, crit, opt, steps=3)
    assert applied == [0, 2]  # step 1's update was not applied; the weights stayed finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rep = a.report
    assert rep.skipped_steps == (PLANT,) and rep.nonfinite_steps == (PLANT,) and rep.steps_checked == 3
    assert [r.dump.name for r in rep.reports] == [f"step{PLANT:08d}-rank0"]


@pytest.mark.slow  # one more full run; keeps the quick set of these tests near its CPU budget
def test_dump_and_continue_goes_on_and_max_skips_stops(model, tmp_path):
    crit = Criterion()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    with nanscope.watch.attach(crit, tmp_path / "d", model=model, on_nonfinite="dump-and-continue") as a:
        applied = train(model, crit, opt, steps=2)
    assert PLANT in applied and a.report.nonfinite_steps[0] == PLANT  # the NaN update went in: the user asked
    assert (tmp_path / "d" / f"step{PLANT:08d}-rank0" / "checkpoint.pth").is_file()

    with torch.no_grad():  # a NaN weight: every step is bad from now on
        next(p for n, p in model.named_parameters() if "decoder" in n).fill_(float("nan"))
    with pytest.raises(NonFiniteStepError, match="max_skips=1"):
        with nanscope.watch.attach(crit, tmp_path / "e", model=model, optimizer=opt, on_nonfinite="skip",
                                   max_skips=1) as b:
            train(model, crit, opt, steps=2, plant=None)
    assert b.report.skipped_steps == (0,) and b.report.nonfinite_steps == (0, 1) and b.report.stopped


@pytest.mark.slow  # one more full run; keeps the quick set of these tests near its CPU budget
def test_function_criterion_is_called_through_the_attachment(model, tmp_path):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    crit = nanscope.watch.attach(masked_terms, tmp_path / "d", model=model)
    with pytest.raises(NonFiniteStepError) as info:
        train(model, crit, opt, steps=2)
    assert info.value.report.step == PLANT and not model._forward_pre_hooks  # stop detached everything


def test_a_raising_forward_is_dumped_as_the_step_it_came_from(model, tmp_path):
    def matcher_refuses(outputs, targets):
        if not torch.isfinite(outputs["pred_boxes"]).all():
            raise ValueError("matrix contains invalid numeric entries")
        return masked_terms(outputs, targets)

    crit = nanscope.watch.attach(matcher_refuses, tmp_path / "d", model=model)
    with pytest.raises(ValueError, match="invalid numeric"), pytest.warns(RuntimeWarning, match="dumped"):
        train(model, crit, torch.optim.SGD(model.parameters(), lr=1e-4), steps=2)
    rep = crit.report
    assert rep.stopped and rep.first.reason == "exception" and rep.first.step == PLANT
    assert rep.first.findings[0].code == "NS203"  # the matcher refusing non-finite costs


@pytest.mark.parametrize("obj, message", [
    (nn.Linear(2, 2), "returned a tensor of shape [1, 2]"),
    (lambda x: {"pred_logits": torch.zeros(1, 3, 4)}, "returned a dict without loss terms (keys: pred_logits)"),
    (lambda x: "text", "returned a str, which carries no loss terms"),
])
def test_an_object_without_loss_terms_is_a_clear_error(obj, message, tmp_path):
    model = nn.Linear(2, 2)
    a = nanscope.watch.attach(obj, tmp_path, model=model)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        a(torch.zeros(1, 2))
    a.detach()


def test_bad_arguments_name_what_was_given(tmp_path):
    with pytest.raises(InputError, match="needs model="):
        nanscope.watch.attach(lambda o, t: {}, tmp_path)
    with pytest.raises(InputError, match="on_nonfinite='ignore'"):
        nanscope.watch.attach(nn.Linear(1, 1), tmp_path, on_nonfinite="ignore")
    with pytest.raises(InputError, match="needs optimizer="):
        nanscope.watch.attach(nn.Linear(1, 1), tmp_path, on_nonfinite="skip")
    with pytest.raises(InputError, match="attach\\(\\) got a int"):
        nanscope.watch.attach(3, tmp_path)
    model = nn.Linear(1, 1)
    with pytest.raises(InputError, match="optimizer= is a str"):
        nanscope.watch.attach(model, tmp_path, optimizer="sgd")
    assert not model._forward_pre_hooks and not model._forward_hooks  # nothing left behind by a refused attach
