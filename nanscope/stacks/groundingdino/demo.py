"""The embedded demo: a small GroundingDINO from the real groundingdino-py modules, and a batch that NaNs.

`write_demo(folder)` writes `text_encoder/` (tiny BERT + vocab), `config.json`, `checkpoint.pth`
(groundingdino's `{"model": state_dict}` layout) and `batch.pt` (the documented batch schema).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanscope.stacks.groundingdino.stack import build_model, default_config_path

# The small Swin: one block per stage keeps a forward at ~0.25 s on a laptop CPU. Output channels
# 64/128/256 for return_interm_indices [1, 2, 3] as groundingdino expects (embed_dim * 2**i).
DEMO_SWIN = {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 7}

DEMO_OVERRIDES: dict[str, Any] = {
    "enc_layers": 1,
    "dec_layers": 1,
    "dim_feedforward": 256,  # SwinT-OGC uses 2048; small keeps the demo fast
    "use_checkpoint": False,  # activation checkpointing only costs time on the demo
    "use_transformer_ckpt": False,
    "fusion_droppath": 0.0,  # deterministic replays
    "nanscope_swin": DEMO_SWIN,
}

DEMO_IMAGE_SIZE = 224  # the smallest size that works with 900 queries

# A long prompt: 72 category phrases of 3 words (4 tokens each with the " ." separator) make 290
# tokens, so the last ones fall past max_text_len=256.
_LONG_WORDS = ["red", "blue", "green", "yellow", "black", "white", "small", "large"]
_LONG_NOUNS = ["cat", "dog", "horse", "sheep", "cow", "zebra", "giraffe", "bear", "bird", "car"]


def long_caption(n_phrases: int = 72) -> tuple[str, list[str]]:
    """A caption of `n_phrases` distinct 'adj adj noun' phrases joined by ' . ' (GLIP style)."""
    phrases = []
    i = 0
    while len(phrases) < n_phrases:
        a = _LONG_WORDS[i % len(_LONG_WORDS)]
        b = _LONG_WORDS[(i // len(_LONG_WORDS) + 1 + i) % len(_LONG_WORDS)]
        n = _LONG_NOUNS[i % len(_LONG_NOUNS)]
        p = f"{a} {b} {n}"
        if p not in phrases and a != b:
            phrases.append(p)
        i += 1
    return " . ".join(phrases) + " .", phrases


def demo_config(config_template: str | Path | None = None) -> dict[str, Any]:
    """The SwinT-OGC config with the demo's size overrides, as a plain dict."""
    from nanscope.stacks.groundingdino.stack import load_config

    cfg = load_config(config_template or default_config_path())
    d = {k: v for k, v in cfg._cfg_dict.to_dict().items()}
    d.update(DEMO_OVERRIDES)
    return d


def demo_batch(seed: int = 0, *, long: bool = True, image_size: int = DEMO_IMAGE_SIZE) -> dict[str, Any]:
    """A batch in nanscope's schema: captions of different lengths, and optionally one over 256 tokens."""
    g = torch.Generator().manual_seed(seed)
    captions = ["cat . dog .", "a photo of a zebra next to a red car ."]
    targets: list[dict[str, Any]] = [
        {"boxes": torch.tensor([[0.30, 0.40, 0.20, 0.30], [0.70, 0.60, 0.25, 0.35]]), "phrases": ["cat", "dog"]},
        {"boxes": torch.tensor([[0.50, 0.50, 0.40, 0.40], [0.20, 0.75, 0.20, 0.15]]), "phrases": ["zebra", "red car"]},
    ]
    if long:
        cap, phrases = long_caption()
        picked = [phrases[3], phrases[-2], phrases[-1]]  # one early phrase, two that fall past 256 tokens
        captions.append(cap)
        targets.append({"boxes": torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.6, 0.4, 0.3, 0.2], [0.5, 0.8, 0.2, 0.2]]),
                        "phrases": picked})
    images = torch.randn(len(captions), 3, image_size, image_size, generator=g)
    return {"images": images, "captions": captions, "targets": targets}


@dataclass(frozen=True)
class DemoFiles:
    folder: Path
    config: Path
    text_encoder: Path
    checkpoint: Path
    batch: Path


def write_demo(folder: str | Path, *, seed: int = 0, long: bool = True) -> DemoFiles:
    """Write the demo model, its config, a checkpoint and a batch into `folder` (created if needed)."""
    from nanscope.stacks.tiny_text import write_tiny_text_encoder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    te = write_tiny_text_encoder(folder / "text_encoder", seed=seed)
    cfg = demo_config()
    cfg["text_encoder_type"] = "text_encoder"  # relative to the config; the loader resolves it
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
    model, _ = build_model(config_path, text_encoder=te, seed=seed)
    ckpt = folder / "checkpoint.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    batch = folder / "batch.pt"
    torch.save(demo_batch(seed, long=long), batch)
    return DemoFiles(folder, config_path, te, ckpt, batch)
