"""NanscopeCallback in a real Lightning Trainer on the tiny HF GroundingDino, a few CPU steps."""

from __future__ import annotations

import json

import pytest
import torch

from nanscope.cli import main
from nanscope.stacks.transformers.loading import load_tokenizer
from nanscope.watch.report import NonFiniteStepError

from _hf_training import PLANT, collate, examples, hf_folder, nan_logits_at

L = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")
from nanscope.integrations.lightning import NanscopeCallback  # noqa: E402


class Detector(L.LightningModule):
    def __init__(self, folder) -> None:
        super().__init__()
        self.model = transformers.GroundingDinoForObjectDetection.from_pretrained(folder).train()  # loads in eval mode

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss  # Lightning sees only this scalar

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hf_folder(tmp_path_factory)


def fit(folder, tmp_path, cb, data, steps: int = 3, plant_logits: bool = False):
    module = Detector(folder)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=[cb],
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    if plant_logits:
        nan_logits_at(module.model, lambda: trainer.global_step, PLANT)
    loader = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=collate)
    return module, trainer, lambda: trainer.fit(module, loader)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_loss_term_stops_or_skips_at_that_step(folder, tmp_path, policy):
    cb = NanscopeCallback(tmp_path / "dumps", attach_to="model", on_nonfinite=policy)
    module, trainer, run = fit(folder, tmp_path, cb, examples(load_tokenizer(folder), 3), plant_logits=True)
    if policy == "stop":
        with pytest.raises(NonFiniteStepError, match=f"at step {PLANT}"):
            run()
        assert trainer.global_step == PLANT + 1  # stopped right after the bad step
    else:
        run()
        assert trainer.global_step == 3 and cb.report.skipped_steps == (PLANT,)
    rep = cb.report
    assert rep.nonfinite_steps == (PLANT,) and "loss_ce" in rep.first.nonfinite_terms
    assert json.loads((rep.first.dump / "manifest.json").read_text())["step"] == PLANT
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the NaN update was never applied
    assert float(trainer.callback_metrics["nanscope/nonfinite_steps"]) == 1
    assert not module.model._forward_hooks and not module.model._forward_pre_hooks


@pytest.mark.slow  # one more full run; keeps the quick set of these tests near its CPU budget
def test_a_nan_pixel_is_dumped_and_replays_to_the_pixel(folder, tmp_path, capsys):
    cb = NanscopeCallback(tmp_path / "dumps", attach_to="model")
    module, trainer, run = fit(folder, tmp_path, cb, examples(load_tokenizer(folder), 3, nan_pixel_at=PLANT))
    with pytest.raises(ValueError, match="x0, y0, x1, y1"), pytest.warns(RuntimeWarning, match="dumped"):
        run()
    (dump,) = sorted((tmp_path / "dumps").glob("step*-rank0"))
    assert json.loads((dump / "manifest.json").read_text())["step"] == PLANT
    assert main(["inspect", str(dump), "--json", str(tmp_path / "r.json")]) == 1
    capsys.readouterr()
    assert json.loads((tmp_path / "r.json").read_text())["findings"][0]["code"] == "NS304"
    assert not module.model._forward_hooks  # on_exception detached


def test_a_healthy_run_gives_no_alarm_and_a_wrong_attribute_is_named(folder, tmp_path):
    cb = NanscopeCallback(tmp_path / "dumps", attach_to="model")
    module, trainer, run = fit(folder, tmp_path, cb, examples(load_tokenizer(folder), 2), steps=2)
    run()
    assert cb.report.steps_checked == 2 and cb.report.nonfinite_steps == () and not (tmp_path / "dumps").exists()
    from nanscope.errors import InputError

    bad = NanscopeCallback(tmp_path / "dumps")  # attach_to="criterion": Detector has none
    _, _, run = fit(folder, tmp_path, bad, examples(load_tokenizer(folder), 1), steps=1)
    with pytest.raises(InputError, match="Detector has no attribute 'criterion' \\(its child modules: model\\)"):
        run()
