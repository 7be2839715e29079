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
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn



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
    captions: list[str] | None = None  # the captions the detector itself received (inside any wrapper)
    tokenizer: Any = None  # the detector's tokenizer, for the `token` output (None: not known)

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
        """DETR-convention outputs for a criterion (keys: docs/criterion-protocol.md).

        `pred_logits`/`pred_boxes` (last layer), `aux_outputs`, `enc_outputs` and its Open-GroundingDino
        name `interm_outputs`, `text_token_mask` [B, L] and `text_mask` [B, T] (padded with False),
        `token`/`tokenized` (the tokenizer's BatchEncoding of the captions, as the model computes it)
        when the captions and tokenizer are known, and `dn_meta` None (no denoising queries).
        """
        boxes = self.layer_boxes()
        logits = self.layer_logits[-1]
        out: dict[str, Any] = {
            "pred_logits": logits,
            "pred_boxes": boxes[-1],
            "text_token_mask": self.text_token_mask,
            "aux_outputs": [
                {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(self.layer_logits[:-1], boxes[:-1])
            ],
        }
        if self.text_token_mask is not None:
            out["text_mask"] = padded_mask(self.text_token_mask, logits.shape[-1])
        enc = self.enc_logits()
        if enc is not None and self.enc_boxes is not None:
            out["enc_outputs"] = {"pred_logits": enc, "pred_boxes": self.enc_boxes}
            out["interm_outputs"] = {"pred_logits": enc, "pred_boxes": self.enc_boxes}
        token = self.token()
        if token is not None:
            out["token"] = out["tokenized"] = token
        out["dn_meta"] = None
        return out

    def token(self) -> Any:
        """`tokenizer(captions, padding="longest", return_tensors="pt")` as groundingdino computes it (tensors cut
        at max_text_len, the encodings' char_to_token untruncated), on the logits' device, once; None if unknown."""
        if self.captions is None or self.tokenizer is None or not self.layer_logits:
            return None
        if getattr(self, "_token", None) is None:
            width = self.layer_logits[-1].shape[-1]
            enc = self.tokenizer(list(self.captions), padding="longest", return_tensors="pt")
            for key in ("input_ids", "attention_mask", "token_type_ids"):  # the model cuts them at max_text_len
                if key in enc and enc[key].shape[1] > width:
                    enc[key] = enc[key][:, :width]
            self._token = enc.to(self.layer_logits[-1].device)
        return self._token


LAYER_DICTS = ("enc_outputs", "interm_outputs")  # output keys holding one layer's {pred_logits, pred_boxes}


def padded_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """[B, L] bool -> [B, width], False past L (what ContrastiveEmbed pads with -inf); L > width is cut."""
    out = torch.zeros(mask.shape[0], width, dtype=torch.bool, device=mask.device)
    n = min(width, mask.shape[1])
    out[:, :n] = mask[:, :n].bool()
    return out


def map_layers(outputs: Mapping[str, Any], fn: Callable[[dict[str, Any]], dict[str, Any]],
               mask: torch.Tensor | None = None) -> dict[str, Any]:
    """Copy of `to_outputs()`-style outputs with `fn` applied to every layer's dict (the top level, each
    `aux_outputs` entry, `enc_outputs`, `interm_outputs`); `mask` [B, L] replaces `text_token_mask`
    and `text_mask` (padded to the new logits' width). Other keys are kept as they are."""
    out = fn(dict(outputs))
    out["aux_outputs"] = [fn(dict(a)) for a in outputs.get("aux_outputs") or ()]
    for key in LAYER_DICTS:
        if outputs.get(key) is not None:
            out[key] = fn(dict(outputs[key]))
    if mask is not None:
        out["text_token_mask"] = mask
        if "text_mask" in outputs:
            out["text_mask"] = padded_mask(mask, out["pred_logits"].shape[-1])
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
