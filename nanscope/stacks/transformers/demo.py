"""The transformers demo: a tiny real `GroundingDinoForObjectDetection` built offline, saved the way
users save theirs (`save_pretrained`, tokenizer in the same folder), and the demo's long-caption batch.

`write_hf_demo(folder)` writes `model/` (config.json, model.safetensors, the tokenizer) and `batch.pt`
(nanscope's schema, the same batch as the groundingdino-py demo). 1.75M parameters, ~0.1 s per CPU
forward of the 3-image batch at 224 px.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The small model: one block per Swin stage, one encoder layer, two decoder layers (transformers 5.x
# cannot build `decoder_layers=1`: its weight tying needs a second box head), 900 queries as usual.
TINY_SWIN = {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 7,
             "out_features": ["stage2", "stage3", "stage4"]}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
TINY_DETECTOR = {"d_model": 64, "encoder_layers": 1, "decoder_layers": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                 "encoder_attention_heads": 4, "decoder_attention_heads": 4, "num_queries": 900,
                 "auxiliary_loss": True}  # supervise both decoder layers, as fine-tuning setups usually do


def write_tokenizer(folder: str | Path) -> Any:
    """nanscope's tiny WordPiece vocab as a fast BERT tokenizer, written to `folder` and loaded back.

    Written as vocab.txt + tokenizer_config.json and read with `AutoTokenizer.from_pretrained(folder)`,
    which works on transformers 4.x and 5.x (5.x ignores `BertTokenizerFast(vocab_file=...)`).
    """
    from transformers import AutoTokenizer

    from nanscope.stacks.transformers.loading import quiet_transformers
    from nanscope.stacks.tiny_text import build_vocab

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(build_vocab()) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": True}), encoding="utf-8")
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tiny_model(vocab_size: int, *, mm: bool = False, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny GroundingDinoForObjectDetection (or MM-) with random weights, in eval mode."""
    import transformers

    from nanscope.stacks.transformers.loading import quiet_transformers

    swin = transformers.SwinConfig(**TINY_SWIN)
    bert = transformers.BertConfig(vocab_size=vocab_size, **TINY_BERT)
    kw = {**TINY_DETECTOR, **overrides}
    cfg_cls = transformers.MMGroundingDinoConfig if mm else transformers.GroundingDinoConfig
    cls = transformers.MMGroundingDinoForObjectDetection if mm else transformers.GroundingDinoForObjectDetection
    torch.manual_seed(seed)
    with quiet_transformers():
        return cls(cfg_cls(backbone_config=swin, text_config=bert, **kw)).eval()


@dataclass(frozen=True)
class HfDemoFiles:
    folder: Path
    model: Path  # the save_pretrained folder (with the tokenizer)
    batch: Path


def write_hf_model(folder: str | Path, *, mm: bool = False, seed: int = 0, **overrides: Any) -> Path:
    """A save_pretrained folder of a tiny model, with its tokenizer saved next to it."""
    from nanscope.stacks.transformers.loading import quiet_transformers

    folder = Path(folder)
    tok = write_tokenizer(folder)
    model = tiny_model(len(tok), mm=mm, seed=seed, **overrides)
    with quiet_transformers():
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
    return folder


def write_hf_demo(folder: str | Path, *, seed: int = 0, long: bool = True, mm: bool = False) -> HfDemoFiles:
    """Write the tiny transformers model and the demo batch into `folder` (created if needed)."""
    from nanscope.stacks.groundingdino.demo import demo_batch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = write_hf_model(folder / "model", mm=mm, seed=seed)
    batch = folder / "batch.pt"
    torch.save(demo_batch(seed, long=long), batch)
    return HfDemoFiles(folder, model, batch)
