"""NanscopeCallback in a real transformers.Trainer on the tiny HF GroundingDino, a few CPU steps."""

from __future__ import annotations

import json

import pytest
import torch

from nanscope.cli import main
from nanscope.integrations.transformers import NanscopeCallback
from nanscope.stacks.transformers.loading import load_tokenizer
from nanscope.watch.report import NonFiniteStepError

from _hf_training import PLANT, collate, examples, hf_folder, nan_logits_at

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hf_folder(tmp_path_factory)


class Recorder(transformers.TrainerCallback):
    """What a report_to logger is given in on_log (it comes before NanscopeCallback in the list)."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})


def trainer_for(folder, tmp_path, data, callback, steps: int = 3, **args):
    model = transformers.GroundingDinoForObjectDetection.from_pretrained(folder)
    kw = {"logging_steps": 100, "report_to": "none", **args}
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=1, max_steps=steps,
        save_strategy="no", remove_unused_columns=False, dataloader_num_workers=0, learning_rate=1e-3, seed=0, **kw)
    return transformers.Trainer(model=model, args=targs, train_dataset=data, data_collator=collate,
                                callbacks=[Recorder(), callback])


def logged(trainer) -> list[dict]:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Recorder)).logs


def test_a_nan_pixel_dumps_that_step_and_the_dump_replays_to_the_pixel(folder, tmp_path, capsys):
    tok = load_tokenizer(folder)
    cb = NanscopeCallback(tmp_path / "dumps")
    trainer = trainer_for(folder, tmp_path, examples(tok, 3, nan_pixel_at=PLANT), cb)
    with pytest.raises(ValueError, match="x0, y0, x1, y1"), pytest.warns(RuntimeWarning, match="dumped"):
        trainer.train()  # transformers' matcher raises on the NaN boxes inside the model's forward
    (dump,) = sorted((tmp_path / "dumps").glob("step*-rank0"))
    manifest = json.loads((dump / "manifest.json").read_text())
    assert manifest["step"] == PLANT and manifest["reason"] == "exception"
    assert main(["inspect", str(dump), "--json", str(tmp_path / "r.json")]) == 1
    capsys.readouterr()
    first = json.loads((tmp_path / "r.json").read_text())["findings"][0]
    assert first["code"] == "NS304" and first["where"][0]["image"] == 0  # the one image of that batch


@pytest.mark.parametrize("policy", ["stop", "skip", "dump-and-continue"])
def test_a_nan_loss_term_stops_or_skips_at_that_step_and_is_logged(folder, tmp_path, policy):
    tok = load_tokenizer(folder)
    cb = NanscopeCallback(tmp_path / "dumps", on_nonfinite=policy)
    trainer = trainer_for(folder, tmp_path, examples(tok, 3), cb)
    nan_logits_at(trainer.model, lambda: trainer.state.global_step, PLANT)
    if policy == "stop":
        with pytest.raises(NonFiniteStepError, match=f"at step {PLANT}"):
            trainer.train()
        assert trainer.state.global_step == PLANT + 1  # stopped after the bad step, which was not applied
    elif policy == "skip":
        trainer.train()
        assert trainer.state.global_step == 3
    else:  # the NaN update went in: the next step's boxes are NaN and transformers' matcher raises
        with pytest.raises(ValueError, match="x0, y0, x1, y1"), pytest.warns(RuntimeWarning, match="dumped"):
            trainer.train()
        assert [r.reason for r in cb.report.reports] == ["nonfinite_loss", "exception"]
    rep = cb.report
    assert rep.nonfinite_steps[0] == PLANT and "loss_ce" in rep.first.nonfinite_terms
    assert (rep.first.dump / "checkpoint.pth").is_file()
    first_log = logged(trainer)[0]  # logging_steps=100: the bad step made the Trainer log at once
    assert first_log["step"] == PLANT + 1 and first_log["nanscope/nonfinite_steps"] == 1
    finite = all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert finite is (policy != "dump-and-continue")  # only dump-and-continue applies the NaN update
    if policy != "dump-and-continue":  # the raising run ends without on_train_end: its hooks stay, inert
        assert not trainer.model._forward_hooks and not trainer.model._forward_pre_hooks


def test_a_healthy_run_gives_no_alarm(folder, tmp_path):
    cb = NanscopeCallback(tmp_path / "dumps")
    trainer = trainer_for(folder, tmp_path, examples(load_tokenizer(folder), 2), cb, steps=2, logging_steps=1)
    trainer.train()
    assert cb.report.steps_checked == 2 and cb.report.nonfinite_steps == () and not (tmp_path / "dumps").exists()
    assert [h["nanscope/nonfinite_steps"] for h in logged(trainer) if "loss" in h] == [0, 0]
