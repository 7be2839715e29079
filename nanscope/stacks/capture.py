"""What one forward fed to the loss, per decoder layer and encoder, whatever the model family.

`capture(model)` is a context manager; inside it every forward of the model (or the detector inside
its wrappers) appends a `ForwardRecord`. The stack of the model (`nanscope.stacks.stack_for_model`)
installs the hooks: they only keep references (no device-to-host copies, so nothing synchronizes on
CUDA), tensors are detached unless `detach=False` (verify-fix backpropagates through them), and every
hook is removed on exit, also when the forward raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from nanscope._callable_module import make_callable


@dataclass
class ForwardRecord:
    """What one forward produced. Shapes: B images, Q queries, T = max_text_len text columns.

    A stack fills `layer_logits`, `text_token_mask`, `input_ids` and `outputs`, and either `boxes`
    directly or overrides `layer_boxes()` / `enc_logits()` to derive them lazily (no work in the hooks).
    """

    layer_logits: list[torch.Tensor] = field(default_factory=list)  # per decoder layer [B, Q, T]
    boxes: list[torch.Tensor] = field(default_factory=list)  # per decoder layer [B, Q, 4] cxcywh in [0, 1]
    enc_logits_selected: torch.Tensor | None = None  # [B, Q, T] encoder proposals at the selected queries
    enc_boxes: torch.Tensor | None = None  # [B, Q, 4] selected proposals (cxcywh)
    text_token_mask: torch.Tensor | None = None  # [B, L] bool, True for real tokens (L <= T)
    input_ids: torch.Tensor | None = None  # [B, L]
    outputs: dict[str, Any] | None = None  # what the model returned (as a dict)
    num_queries: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_logits)

    @property
    def has_encoder(self) -> bool:
        return self.enc_logits() is not None

    def layer_boxes(self) -> list[torch.Tensor]:
        """Per-layer predicted boxes [B, Q, 4] (the last is what the model returns)."""
        return list(self.boxes)

    def enc_logits(self) -> torch.Tensor | None:
        """Encoder-proposal logits at the queries the model selected [B, Q, T]."""
        return self.enc_logits_selected

    def layer_names(self) -> list[str]:
        """'dec0' ... 'decN-1' (the last is what `pred_logits` holds), then 'enc' if present."""
        names = [f"dec{i}" for i in range(self.num_layers)]
        if self.has_encoder:
            names.append("enc")
        return names

    def logits_by_layer(self) -> dict[str, torch.Tensor]:
        out = dict(zip([f"dec{i}" for i in range(self.num_layers)], self.layer_logits))
        enc = self.enc_logits()
        if enc is not None:
            out["enc"] = enc
        return out

    def boxes_by_layer(self) -> dict[str, torch.Tensor]:
        out = dict(zip([f"dec{i}" for i in range(self.num_layers)], self.layer_boxes()))
        if self.enc_boxes is not None:
            out["enc"] = self.enc_boxes
        return out

    def to_outputs(self) -> dict[str, Any]:
        """DETR-convention outputs for a criterion: last layer, `aux_outputs`, `enc_outputs`, text mask."""
        boxes = self.layer_boxes()
        out: dict[str, Any] = {
            "pred_logits": self.layer_logits[-1],
            "pred_boxes": boxes[-1],
            "text_token_mask": self.text_token_mask,
            "aux_outputs": [
                {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(self.layer_logits[:-1], boxes[:-1])
            ],
        }
        enc = self.enc_logits()
        if enc is not None and self.enc_boxes is not None:
            out["enc_outputs"] = {"pred_logits": enc, "pred_boxes": self.enc_boxes}
        return out


class Capture:
    """Holds the records of the forwards run inside `capture(...)`."""

    def __init__(self) -> None:
        self.records: list[ForwardRecord] = []

    @property
    def last(self) -> ForwardRecord:
        if not self.records:
            raise RuntimeError("no forward of the model ran inside capture()")
        return self.records[-1]


def unique_modules(modules: Any) -> list[nn.Module]:
    """`nn.Module`s of an iterable, each once (GroundingDINO shares heads across layers), in order."""
    seen: dict[int, nn.Module] = {}
    for m in modules:
        if isinstance(m, nn.Module):
            seen.setdefault(id(m), m)
    return list(seen.values())


@contextlib.contextmanager
def capture(model: nn.Module, *, detach: bool = True) -> Iterator[Capture]:
    """Record what each forward of `model` (or the detector inside it) feeds to a loss."""
    from nanscope.stacks import stack_for_model

    with stack_for_model(model).capture(model, detach=detach) as cap:
        yield cap


make_callable(__name__)  # `nanscope.capture(model)` works after `import nanscope.capture` too
