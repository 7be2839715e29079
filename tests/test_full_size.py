"""The default SwinT-OGC config (173M parameters) through the same code path, with random weights."""

from __future__ import annotations

import pytest
import torch

from nanscope.replay.diagnose import inspect
from nanscope.stacks.groundingdino.demo import demo_batch
from nanscope.stacks.groundingdino.stack import build_model


@pytest.mark.slow
def test_full_size_swint_ogc_checkpoint_inspects(demo_files, tmp_path):
    model, cfg = build_model(None, text_encoder=demo_files.text_encoder, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    assert cfg.backbone == "swin_T_224_1k" and cfg.enc_layers == 6 and cfg.dec_layers == 6
    ckpt = tmp_path / "groundingdino_swint_ogc_random.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)  # as DDP saves
    del model
    batch = demo_batch(0, long=False)
    batch["images"] = batch["images"][:2]
    bp = tmp_path / "batch.pt"
    torch.save(batch, bp)
    result = inspect(ckpt, bp, text_encoder=str(demo_files.text_encoder))
    assert n_params > 60_000_000  # 173M with bert-base; ~63M with the tiny local BERT
    assert result.summary["decoder_layers"] == 6 and result.summary["queries"] == 900
    codes = {f.code for f in result.findings}
    assert "NS306" not in codes  # every key fits
    assert "NS101" in codes
