"""NanscopeHook in a real MMEngine Runner (from a config dict, via the HOOKS registry), the tiny HF GroundingDino in a
BaseModel whose forward(mode='loss') returns the loss dict, as MMDetection's detectors do."""

from __future__ import annotations

import json

import pytest
import torch

from nanscope.cli import main
from nanscope.stacks.transformers.loading import load_tokenizer
from nanscope.watch.report import NonFiniteStepError

from _hf_training import PLANT, collate, examples, hf_folder, nan_logits_at

mmengine = pytest.importorskip("mmengine")
transformers = pytest.importorskip("transformers")
import nanscope.integrations.mmengine  # noqa: E402,F401  (registers NanscopeHook)
from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402


class MMDetector(BaseModel):
    def __init__(self, folder) -> None:
        super().__init__()
        self.model = transformers.GroundingDinoForObjectDetection.from_pretrained(folder).train()

    def forward(self, inputs, data_samples=None, mode="tensor"):
        out = self.model(pixel_values=inputs, **data_samples)
        return dict(out.loss_dict) if mode == "loss" else out.logits


def mm_collate(items):
    batch = collate(items)
    return {"inputs": batch.pop("pixel_values"), "data_samples": batch}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hf_folder(tmp_path_factory)


def runner_for(folder, tmp_path, data, hook: dict, steps: int = 3) -> Runner:
    return Runner(
        model=MMDetector(folder), work_dir=str(tmp_path / "work"),
        train_dataloader=dict(dataset=list(data.items), sampler=dict(type="DefaultSampler", shuffle=False),
                              batch_size=1, collate_fn=mm_collate, num_workers=0),
        train_cfg=dict(by_epoch=False, max_iters=steps), optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-3)),
        custom_hooks=[dict(type="NanscopeHook", dump_dir=str(tmp_path / "dumps"), **hook)],
        default_hooks=dict(checkpoint=None, logger=dict(type="LoggerHook", interval=1)),
    )


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_loss_term_stops_or_skips_at_that_iteration(folder, tmp_path, policy):
    runner = runner_for(folder, tmp_path, examples(load_tokenizer(folder), 3), {"on_nonfinite": policy})
    nan_logits_at(runner.model.model, lambda: runner.iter, PLANT)
    if policy == "stop":
        with pytest.raises(NonFiniteStepError, match=f"at step {PLANT}"):
            runner.train()
        assert runner.iter == PLANT + 1
    else:
        runner.train()
        assert runner.iter == 3
    (hook,) = [h for h in runner.hooks if type(h).__name__ == "NanscopeHook"]
    rep = hook.report
    assert rep.nonfinite_steps == (PLANT,) and "loss_ce" in rep.first.nonfinite_terms
    assert rep.skipped_steps == ((PLANT,) if policy == "skip" else ())
    assert all(torch.isfinite(p).all() for p in runner.model.parameters())  # the NaN update was not applied
    assert runner.message_hub.get_scalar("train/nanscope_nonfinite_steps").current() == 1
    manifest = json.loads((rep.first.dump / "manifest.json").read_text())
    assert manifest["step"] == PLANT and manifest["stack"]["stack"] == "transformers"  # the detector inside


@pytest.mark.slow  # one more full run; keeps the quick set of these tests near its CPU budget
def test_a_nan_pixel_is_dumped_and_replays_to_the_pixel(folder, tmp_path, capsys):
    runner = runner_for(folder, tmp_path, examples(load_tokenizer(folder), 3, nan_pixel_at=PLANT), {})
    with pytest.raises(ValueError, match="x0, y0, x1, y1"), pytest.warns(RuntimeWarning, match="dumped"):
        runner.train()
    (dump,) = sorted((tmp_path / "dumps").glob("step*-rank0"))
    assert json.loads((dump / "manifest.json").read_text())["step"] == PLANT
    assert main(["inspect", str(dump), "--json", str(tmp_path / "r.json")]) == 1
    capsys.readouterr()
    assert json.loads((tmp_path / "r.json").read_text())["findings"][0]["code"] == "NS304"


def test_a_healthy_run_gives_no_alarm(folder, tmp_path):
    runner = runner_for(folder, tmp_path, examples(load_tokenizer(folder), 2), {}, steps=2)
    runner.train()
    (hook,) = [h for h in runner.hooks if type(h).__name__ == "NanscopeHook"]
    assert hook.report.steps_checked == 2 and hook.report.nonfinite_steps == ()
    assert not (tmp_path / "dumps").exists() and not runner.model._forward_hooks
