"""Capture hooks on the real model: equal to the model's own outputs, removed on exit and on errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nanscope.stacks.capture import capture
from nanscope.stacks.groundingdino.stack import find_groundingdino


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_captured_tensors_equal_model_outputs(demo_replay):
    model, batch = demo_replay.model, demo_replay.batch
    with torch.no_grad(), capture(model) as cap:
        out = model(batch.images, captions=list(batch.captions))
    rec = cap.last
    assert torch.equal(rec.layer_logits[-1], out["pred_logits"])
    assert torch.equal(rec.layer_boxes()[-1], out["pred_boxes"])
    # The text mask equals the tokenizer's attention mask, truncated to 256 (computed independently).
    tok = model.tokenizer(list(batch.captions), padding="longest", return_tensors="pt")
    assert torch.equal(rec.text_token_mask, tok["attention_mask"][:, :256].bool())
    assert torch.equal(rec.input_ids, tok["input_ids"][:, :256])
    # -inf exactly where the mask is False (padded to 256 columns).
    valid = torch.zeros(len(batch), 256, dtype=torch.bool)
    valid[:, : rec.text_token_mask.shape[1]] = rec.text_token_mask
    assert torch.equal(torch.isneginf(out["pred_logits"]).all(1), ~valid)
    enc = rec.enc_logits()
    assert enc.shape == out["pred_logits"].shape and not rec.layer_logits[-1].requires_grad


def test_hooks_removed_after_exception_in_forward(demo_replay):
    model = demo_replay.model
    before = _hook_count(model)
    with pytest.raises(RuntimeError):
        with torch.no_grad(), capture(model):
            model(torch.zeros(1, 3, 224, 224), captions=["cat .", "dog ."])  # 1 image, 2 captions
    assert _hook_count(model) == before


class DDPLike(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.module = m


class PeftLike(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = m


class CompiledLike(nn.Module):
    def __init__(self, m):
        super().__init__()
        self._orig_mod = m


@pytest.mark.parametrize("wrap", [DDPLike, PeftLike, CompiledLike, lambda m: DDPLike(PeftLike(m))])
def test_find_groundingdino_inside_wrappers(demo_replay, wrap):
    assert find_groundingdino(wrap(demo_replay.model)) is demo_replay.model


