"""Replay one batch through a real GroundingDINO: build, load the checkpoint, run the forward with capture.

Shared by `inspect`, `verify-fix` and the replay of `watch` dumps. Inputs are only read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanscope.replay.batch import Batch, load_batch
from nanscope.stacks.capture import ForwardRecord, capture
from nanscope.stacks.checkpoint import KeyFit, file_sha256, load_into, read_state_dict
from nanscope.errors import DeviceError
from nanscope.stacks.groundingdino_py import build_model, load_config
from nanscope.replay.positive_map import TextInfo, build_text_info


def resolve_device(device: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or None (cuda when available, else cpu)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device!r} is not a device name; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} was asked for but this torch sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device} is not supported; expected cpu or cuda")
    return dev


def resolve_text_encoder(config: str | os.PathLike[str] | None, text_encoder: str | None) -> str | None:
    """An explicit --text-encoder wins; a relative folder named in the config is found next to the config."""
    if text_encoder is not None:
        return text_encoder
    if config is None:
        return None
    cfg = load_config(config)
    te = str(getattr(cfg, "text_encoder_type", ""))
    candidate = Path(config).parent / te
    if te and not Path(te).is_absolute() and candidate.is_dir():
        return str(candidate)
    return None


@dataclass
class Replay:
    """A model with the user's weights, the batch, and what nanscope derived from them."""

    model: nn.Module
    cfg: Any
    batch: Batch
    texts: list[TextInfo]
    state_dict: dict[str, torch.Tensor]
    key_fit: KeyFit
    device: torch.device
    inputs: dict[str, Any]  # paths, hashes, options, for reports

    @property
    def max_text_len(self) -> int:
        return int(getattr(self.cfg, "max_text_len", 256))

    def targets(self) -> list[dict[str, torch.Tensor]]:
        """Criterion targets (DETR convention): boxes [N, 4] cxcywh and binary positive_map [N, T]."""
        return [
            {"boxes": t.boxes.to(self.device), "positive_map": info.positive_map.to(self.device)}
            for t, info in zip(self.batch.targets, self.texts)
        ]

    def samples(self) -> Any:
        """The model input: the image tensor, or groundingdino's NestedTensor when the batch has pixel masks."""
        images = self.batch.images.to(self.device)
        if self.batch.image_masks is None:
            return images
        from groundingdino.util.misc import NestedTensor

        return NestedTensor(images, self.batch.image_masks.to(self.device))

    def forward(self, *, detach: bool = True, grad: bool = False) -> ForwardRecord:
        with torch.set_grad_enabled(grad), capture(self.model, detach=detach) as cap:
            self.model(self.samples(), captions=list(self.batch.captions))
        return cap.last


def prepare(
    checkpoint: str | os.PathLike[str],
    batch: str | os.PathLike[str] | Batch,
    *,
    config: str | os.PathLike[str] | None = None,
    text_encoder: str | None = None,
    device: str | None = "cpu",
    trust_checkpoint: bool = False,
    hash_checkpoint: bool = True,
) -> Replay:
    """Load everything a replay needs; raises `InputError` subclasses with one-line reasons."""
    dev = resolve_device(device)
    b = batch if isinstance(batch, Batch) else load_batch(batch)
    state = read_state_dict(checkpoint, trust=trust_checkpoint)
    te = resolve_text_encoder(config, text_encoder)
    model, cfg = build_model(config, text_encoder=te)
    fit = load_into(model, state, source=f"checkpoint {str(checkpoint)!r}")
    model.to(dev).eval()
    texts = build_text_info(model.tokenizer, b, max_text_len=int(getattr(cfg, "max_text_len", 256)))
    inputs = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint) if hash_checkpoint else None,
        "batch": b.source if isinstance(batch, Batch) else str(batch),
        "config": str(config) if config is not None else "groundingdino SwinT-OGC (default)",
        "text_encoder": str(cfg.text_encoder_type),
        "device": str(dev),
    }
    return Replay(model, cfg, b, texts, state, fit, dev, inputs)
