"""Safe checkpoint loading and a key-fit report (groundingdino's own loader hides missing keys).

`read_state_dict` accepts groundingdino's `{"model": state_dict}`, `{"state_dict": ...}` or a bare
state dict, strips a `module.` prefix (DDP), and loads with `weights_only=True` unless the user passes
`trust=True` (the CLI's `--trust-checkpoint`). The file is only read, never written.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from nanscope.errors import CheckpointError

MIN_FIT = 0.5  # below this fraction of the model's keys matched, the file is another model's state dict
# Unexpected keys that real GroundingDINO checkpoints carry and that are harmless when left out:
# the denoising label embedding (training only; groundingdino-py builds the model with dn_number=0).
TRAINING_ONLY_PREFIXES = ("label_enc.",)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:240]


def read_state_dict(path: str | os.PathLike[str], *, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {name: tensor} dict."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if not trust and "weights_only" in str(exc):
            raise CheckpointError(
                f"checkpoint {str(p)!r} contains pickled Python objects, which can run code when loaded "
                f"({_first_line(exc)}); nanscope loads tensors only. If you trust this file, pass "
                "--trust-checkpoint (or re-save it as {'model': model.state_dict()})."
            ) from None
        raise CheckpointError(f"checkpoint {str(p)!r} is not a readable torch file ({_first_line(exc)})") from None
    except Exception as exc:  # truncated zip, random bytes, ...
        raise CheckpointError(
            f"checkpoint {str(p)!r} is not a readable torch file ({_first_line(exc)}); "
            "expected a file written by torch.save"
        ) from None
    sd: Any = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                sd = obj[key]
                break
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(
            f"checkpoint {str(p)!r} holds a {type(obj).__name__} with no state dict; "
            "expected {'model': state_dict} or a bare state dict"
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = str(k)
        if name.startswith("module."):
            name = name[len("module."):]
        out[name] = v
    if not out:
        raise CheckpointError(f"checkpoint {str(p)!r} holds no tensors; expected a model state dict")
    return out


@dataclass(frozen=True)
class KeyFit:
    """How a state dict fits a model."""

    matched: tuple[str, ...]
    missing: tuple[str, ...]  # in the model, not in the file: left at random init by strict=False
    unexpected: tuple[str, ...]  # in the file, not in the model
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # name, file shape, model shape
    # Unexpected keys known to be harmless, with why: buffers the model keeps out of its state dict
    # (e.g. BERT's position_ids in transformers >= 4.31, saved by older versions) and training-only weights.
    benign: tuple[tuple[str, str], ...] = ()

    @property
    def fraction(self) -> float:
        total = len(self.matched) + len(self.missing) + len(self.mismatched)
        return len(self.matched) / max(total, 1)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def key_fit(model: nn.Module, state: Mapping[str, torch.Tensor]) -> KeyFit:
    own = model.state_dict()
    matched, mismatched = [], []
    for k, v in state.items():
        if k in own:
            if tuple(own[k].shape) == tuple(v.shape):
                matched.append(k)
            else:
                mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
    missing = sorted(k for k in own if k not in state)
    non_persistent = {k for k, _ in model.named_buffers()} - set(own)
    unexpected, benign = [], []
    for k in sorted(k for k in state if k not in own):
        if k in non_persistent:
            benign.append((k, "a non-persistent buffer of this model (rebuilt at init)"))
        elif k.startswith(TRAINING_ONLY_PREFIXES):
            benign.append((k, "training-only (denoising label embedding)"))
        else:
            unexpected.append(k)
    return KeyFit(tuple(sorted(matched)), tuple(missing), tuple(unexpected), tuple(sorted(mismatched)),
                  tuple(benign))


GDPY_EXPECTED = "groundingdino weights such as 'transformer.encoder.layers.0...' - check --config and the file"


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
              expected: str = GDPY_EXPECTED) -> KeyFit:
    """Copy every fitting tensor into `model`; refuse a file that is clearly another model's.

    expected: what the message says a fitting file holds (the stack's key names)."""
    fit = key_fit(model, state)
    if fit.fraction < MIN_FIT:
        some = ", ".join(list(state)[:3])
        raise CheckpointError(
            f"{source} does not look like a checkpoint of this GroundingDINO config: only {len(fit.matched)} of "
            f"{len(fit.matched) + len(fit.missing) + len(fit.mismatched)} model weights are in it "
            f"(its keys start with {some}); expected {expected}"
        )
    fitting = {k: state[k] for k in fit.matched}
    model.load_state_dict(fitting, strict=False)
    return fit


def file_sha256(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
