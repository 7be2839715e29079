"""Forward hooks on a real groundingdino-py GroundingDINO -> `ForwardRecord`s.

Per forward they record:
  - the logits of each decoder layer (each `class_embed` call after the transformer) [B, Q, 256]
  - the encoder-proposal logits (`transformer.enc_out_class_embed`, gathered at the model's own top-k)
  - per-layer boxes: the `bbox_embed` deltas plus the transformer's reference points, exactly as
    GroundingDINO.forward combines them (elementwise math at read time, no module is called again)
  - `text_token_mask` (from the `text_dict` the transformer receives) and the BERT `input_ids`
Calls made while no model forward is running (activation checkpointing re-runs modules during
backward) are ignored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from nanscope.stacks.capture import Capture, ForwardRecord, unique_modules


@dataclass
class GdpyForwardRecord(ForwardRecord):
    """groundingdino-py's raw pieces; boxes and encoder logits are derived when first read."""

    layer_deltas: list[torch.Tensor] | None = None  # per decoder layer [B, Q, 4], unsigmoided
    references: list[torch.Tensor] | None = None  # per decoder layer + 1, [B, Q, 4] sigmoid space
    enc_logits_all: torch.Tensor | None = None  # [B, S, T] for all S encoder tokens

    @property
    def has_encoder(self) -> bool:
        return self.enc_logits_all is not None

    def layer_boxes(self) -> list[torch.Tensor]:
        """Per-layer boxes as GroundingDINO.forward computes them: sigmoid(delta + inverse_sigmoid(ref))."""
        from groundingdino.util.misc import inverse_sigmoid

        if self.references is None or not self.layer_deltas:
            return []
        boxes = [(d + inverse_sigmoid(r)).sigmoid() for d, r in zip(self.layer_deltas, self.references[:-1])]
        if self.outputs is not None and boxes:
            boxes[-1] = self.outputs["pred_boxes"]
        return boxes

    def enc_logits(self) -> torch.Tensor | None:
        """Encoder-proposal logits at the queries the model selected (its own top-k) [B, Q, T]."""
        if self.enc_logits_all is None:
            return None
        k = min(self.num_queries, self.enc_logits_all.shape[1])
        idx = torch.topk(self.enc_logits_all.max(-1)[0], k, dim=1)[1]
        return torch.gather(self.enc_logits_all, 1, idx.unsqueeze(-1).expand(-1, -1, self.enc_logits_all.shape[-1]))


def call_captions(args: Any, kwargs: dict[str, Any]) -> list[str] | None:
    """The captions of a groundingdino-py call: `captions=` or, as its forward does, `targets[i]["caption"]`."""
    caps = kwargs.get("captions")
    if caps is None:
        targets = kwargs.get("targets", args[1] if len(args) > 1 else None)
        if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, dict) for t in targets):
            caps = [t.get("caption") for t in targets]
    if isinstance(caps, (list, tuple)) and caps and all(isinstance(c, str) for c in caps):
        return list(caps)
    return None


@contextlib.contextmanager
def capture_groundingdino(gd: nn.Module, *, detach: bool = True) -> Iterator[Capture]:
    """Hooks on the GroundingDINO module `gd` (already unwrapped)."""
    cap = Capture()
    state = {"active": False, "in_transformer": False}
    keep = (lambda t: t.detach()) if detach else (lambda t: t)
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def rec() -> GdpyForwardRecord:
        return cap.records[-1]  # type: ignore[return-value]

    def root_pre(_m: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        state["active"] = True
        cap.records.append(GdpyForwardRecord(num_queries=int(getattr(gd, "num_queries", 0)), layer_deltas=[],
                                             captions=call_captions(args, kwargs),
                                             tokenizer=getattr(gd, "tokenizer", None)))

    def root_post(_m: nn.Module, _args: Any, output: Any) -> None:
        state["active"] = False
        state["in_transformer"] = False
        if isinstance(output, dict) and cap.records:
            rec().outputs = {k: keep(v) if isinstance(v, torch.Tensor) else v for k, v in output.items()}

    def bert_pre(_m: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if state["active"]:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                rec().input_ids = ids.detach()

    def transformer_pre(_m: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if not state["active"]:
            return
        state["in_transformer"] = True
        text_dict = kwargs.get("text_dict", args[6] if len(args) > 6 else None)
        if isinstance(text_dict, dict) and "text_token_mask" in text_dict:
            rec().text_token_mask = text_dict["text_token_mask"].detach()

    def transformer_post(_m: nn.Module, _args: Any, output: Any) -> None:
        if not state["active"]:
            return
        state["in_transformer"] = False
        _hs, references, _hs_enc, ref_enc, _init = output
        rec().references = [keep(r) for r in references]
        if ref_enc is not None:
            rec().enc_boxes = keep(ref_enc[-1])

    def class_post(_m: nn.Module, _args: Any, output: torch.Tensor) -> None:
        if not state["active"]:
            return
        if state["in_transformer"]:
            rec().enc_logits_all = keep(output)
        else:
            rec().layer_logits.append(keep(output))

    def bbox_post(_m: nn.Module, _args: Any, output: torch.Tensor) -> None:
        if state["active"] and not state["in_transformer"]:
            rec().layer_deltas.append(keep(output))  # type: ignore[union-attr]

    try:
        handles.append(gd.register_forward_pre_hook(root_pre, with_kwargs=True))
        handles.append(gd.register_forward_hook(root_post, always_call=True))
        handles.append(gd.bert.register_forward_pre_hook(bert_pre, with_kwargs=True))
        handles.append(gd.transformer.register_forward_pre_hook(transformer_pre, with_kwargs=True))
        handles.append(gd.transformer.register_forward_hook(transformer_post))
        class_mods = unique_modules(list(gd.class_embed) + [getattr(gd.transformer, "enc_out_class_embed", None)])
        for m in class_mods:
            handles.append(m.register_forward_hook(class_post))
        for m in unique_modules(gd.bbox_embed):
            handles.append(m.register_forward_hook(bbox_post))
        yield cap
    finally:
        for h in handles:
            h.remove()
