"""nanscope.watch.attach in a real Accelerate loop: attach to `accelerator.unwrap_model(model)`, the optimizer that
`prepare` wrapped drops a skipped step (tiny HF GroundingDino, a few CPU steps)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import nanscope.watch
from nanscope.stacks.transformers.loading import load_tokenizer
from nanscope.watch.report import NonFiniteStepError

from _hf_training import PLANT, collate, examples, hf_folder, nan_logits_at

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hf_folder(tmp_path_factory)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_attach_on_the_unwrapped_model_stops_or_skips_the_planted_step(folder, tmp_path, policy):
    accelerator = accelerate.Accelerator(cpu=True)
    model = transformers.GroundingDinoForObjectDetection.from_pretrained(folder).train()
    loader = torch.utils.data.DataLoader(examples(load_tokenizer(folder), 3), batch_size=1, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3), loader)
    step = {"n": 0}
    nan_logits_at(accelerator.unwrap_model(model), lambda: step["n"], PLANT)
    attached = nanscope.watch.attach(accelerator.unwrap_model(model), tmp_path / "dumps", optimizer=optimizer,
                                     on_nonfinite=policy, step=lambda: step["n"])
    updated = []
    with pytest.raises(NonFiniteStepError) if policy == "stop" else contextlib.nullcontext(), attached:
        for batch in loader:
            out = model(**batch)
            accelerator.backward(out.loss)
            before = next(model.parameters()).detach().clone()
            optimizer.step()
            optimizer.zero_grad()
            updated.append(not torch.equal(before, next(model.parameters())))
            step["n"] += 1
    rep = attached.report
    assert rep.nonfinite_steps == (PLANT,) and (rep.first.dump / "checkpoint.pth").is_file()
    if policy == "stop":
        assert updated == [True]  # raised inside the forward of step 1: no backward, no update
    else:
        assert updated == [True, False, True] and rep.skipped_steps == (PLANT,)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not accelerator.unwrap_model(model)._forward_hooks

