"""Forward hooks on a transformers GroundingDino (or MM-GroundingDino) -> `ForwardRecord`s.

Per forward of `GroundingDinoForObjectDetection` they record:
  - the logits of each decoder layer: each call of a head `class_embed[i]` [B, Q, max_text_len], and
    its `text_token_mask` keyword (the `attention_mask` as bool) [B, L]
  - the box deltas of each layer (`bbox_embed[i]` calls) and the reference points the model returns
    (`init_reference_points`, `intermediate_reference_points`); boxes are formed at read time exactly
    as the model does: `sigmoid(delta + torch.special.logit(ref, eps=1e-5))` (groundingdino-py's
    `inverse_sigmoid` uses eps 1e-3, so the two stacks' boxes differ near 0 and 1)
  - the two calls of `model.model.encoder_output_class_embed`: every encoder token (`enc_outputs_class`)
    and the selected queries (`encoder_logits`); `encoder_pred_boxes` from the outputs
  - `input_ids` from the model call.
Module identity differs between transformers versions: 4.57 shares one head module across layers and
calls the same `bbox_embed` inside the decoder for box refinement, 5.x keeps distinct (tied) modules.
So every unique module is hooked once, calls are recorded in order, and head calls made while the
inner `model.model` runs are ignored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from nanscope.stacks.capture import Capture, ForwardRecord, unique_modules

LOGIT_EPS = 1e-5  # transformers' GroundingDinoForObjectDetection.forward: torch.special.logit(reference, eps=1e-5)


@dataclass
class HfForwardRecord(ForwardRecord):
    """transformers' raw pieces; per-layer boxes are formed when first read."""

    layer_deltas: list[torch.Tensor] | None = None  # per decoder layer [B, Q, 4], before the sigmoid
    enc_logits_all: torch.Tensor | None = None  # [B, S, T]: `enc_outputs_class`, every encoder token

    def layer_boxes(self) -> list[torch.Tensor]:
        """Per-layer boxes as GroundingDinoForObjectDetection.forward computes them."""
        if self.boxes:
            return list(self.boxes)
        if not self.layer_deltas or self.outputs is None:
            return []
        init = self.outputs.get("init_reference_points")
        inter = self.outputs.get("intermediate_reference_points")
        if init is None or inter is None:
            return []
        out = []
        for level, delta in enumerate(self.layer_deltas):
            ref = init if level == 0 else inter[:, level - 1]
            ref = torch.special.logit(ref, eps=LOGIT_EPS)
            if ref.shape[-1] == 4:
                coord = delta + ref
            else:  # 2-coordinate references: only the centre is refined (as transformers does)
                coord = torch.cat([delta[..., :2] + ref, delta[..., 2:]], dim=-1)
            out.append(coord.sigmoid())
        return out


def _output_dict(output: Any) -> dict[str, Any] | None:
    if isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
        return dict(output)
    return None


@contextlib.contextmanager
def capture_hf(det: nn.Module, *, detach: bool = True) -> Iterator[Capture]:
    """Hooks on the `*GroundingDinoForObjectDetection` module `det` (already unwrapped)."""
    cap = Capture()
    state = {"active": False, "inner": False, "enc_calls": 0}
    keep = (lambda t: t.detach()) if detach else (lambda t: t)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    num_queries = int(getattr(det.config, "num_queries", 0))

    def rec() -> HfForwardRecord:
        return cap.records[-1]  # type: ignore[return-value]

    def root_pre(_m: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        state.update(active=True, inner=False, enc_calls=0)
        r = HfForwardRecord(num_queries=num_queries, layer_deltas=[])
        ids = kwargs.get("input_ids", args[1] if len(args) > 1 else None)
        if isinstance(ids, torch.Tensor):
            r.input_ids = ids.detach()
        cap.records.append(r)

    def root_post(_m: nn.Module, _args: Any, _kwargs: Any, output: Any) -> None:
        state.update(active=False, inner=False)
        out = _output_dict(output)
        if out is not None and cap.records:
            rec().outputs = {k: keep(v) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
            boxes = rec().outputs.get("encoder_pred_boxes")
            if isinstance(boxes, torch.Tensor):
                rec().enc_boxes = boxes

    def inner_pre(_m: nn.Module, _args: Any) -> None:
        if state["active"]:
            state["inner"] = True

    def inner_post(_m: nn.Module, _args: Any, _output: Any) -> None:
        state["inner"] = False

    def class_post(_m: nn.Module, args: Any, kwargs: dict[str, Any], output: torch.Tensor) -> None:
        if not state["active"] or state["inner"]:
            return
        rec().layer_logits.append(keep(output))
        if rec().text_token_mask is None:
            mask = kwargs.get("text_token_mask", args[2] if len(args) > 2 else None)
            if isinstance(mask, torch.Tensor):
                rec().text_token_mask = mask.detach().bool()

    def bbox_post(_m: nn.Module, _args: Any, output: torch.Tensor) -> None:
        if state["active"] and not state["inner"]:
            rec().layer_deltas.append(keep(output))  # type: ignore[union-attr]

    def enc_post(_m: nn.Module, _args: Any, output: torch.Tensor) -> None:
        if not state["active"]:
            return
        if state["enc_calls"] == 0:
            rec().enc_logits_all = keep(output)  # enc_outputs_class: every encoder token
        else:
            rec().enc_logits_selected = keep(output)  # encoder_logits: the selected queries
        state["enc_calls"] += 1

    try:
        handles.append(det.register_forward_pre_hook(root_pre, with_kwargs=True))
        handles.append(det.register_forward_hook(root_post, with_kwargs=True, always_call=True))
        handles.append(det.model.register_forward_pre_hook(inner_pre))
        handles.append(det.model.register_forward_hook(inner_post, always_call=True))
        for m in unique_modules(det.class_embed):
            handles.append(m.register_forward_hook(class_post, with_kwargs=True))
        for m in unique_modules(det.bbox_embed):
            handles.append(m.register_forward_hook(bbox_post))
        enc = getattr(det.model, "encoder_output_class_embed", None)
        if isinstance(enc, nn.Module):
            handles.append(enc.register_forward_hook(enc_post))
        yield cap
    finally:
        for h in handles:
            h.remove()
