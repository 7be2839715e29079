"""Forward hooks on a real GroundingDINO -> the tensors a loss sees, per decoder layer and encoder.

`capture(model)` is a context manager; inside it every forward of the model records:
  - the logits of each decoder layer (each `class_embed` call after the transformer) [B, Q, 256]
  - the encoder-proposal logits (`transformer.enc_out_class_embed`, gathered at the model's own top-k)
  - per-layer boxes: the `bbox_embed` deltas plus the transformer's reference points, exactly as
    GroundingDINO.forward combines them (elementwise math, no module is called again)
  - `text_token_mask` (from the `text_dict` the transformer receives) and the BERT `input_ids`
Hooks only keep references (no device-to-host copies, so nothing synchronizes on CUDA); tensors are
detached unless `detach=False` (verify-fix backpropagates through them). Every hook is removed on
exit, also when the forward raises. Calls made while no model forward is running (activation
checkpointing re-runs modules during backward) are ignored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from nanscope._callable_module import make_callable
from nanscope.stacks.groundingdino_py import find_groundingdino


@dataclass
class ForwardRecord:
    """What one forward produced. Shapes: B images, Q queries, T = 256 text columns."""

    layer_logits: list[torch.Tensor] = field(default_factory=list)  # per decoder layer [B, Q, T]
    layer_deltas: list[torch.Tensor] = field(default_factory=list)  # per decoder layer [B, Q, 4], unsigmoided
    references: list[torch.Tensor] | None = None  # per decoder layer + 1, [B, Q, 4] sigmoid space
    enc_logits_all: torch.Tensor | None = None  # [B, S, T] for all S encoder tokens
    enc_boxes: torch.Tensor | None = None  # [B, Q, 4] selected proposals (sigmoid)
    text_token_mask: torch.Tensor | None = None  # [B, L] bool, True for real tokens
    input_ids: torch.Tensor | None = None  # [B, L]
    outputs: dict[str, Any] | None = None  # what the model returned
    num_queries: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_logits)

    def layer_boxes(self) -> list[torch.Tensor]:
        """Per-layer boxes as GroundingDINO.forward computes them: sigmoid(delta + inverse_sigmoid(ref))."""
        from groundingdino.util.misc import inverse_sigmoid

        if self.references is None:
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

    def layer_names(self) -> list[str]:
        """'dec0' ... 'decN-1' (the last is what `pred_logits` holds), then 'enc' if present."""
        names = [f"dec{i}" for i in range(self.num_layers)]
        if self.enc_logits_all is not None:
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


def _unique(modules: Any) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for m in modules:
        if isinstance(m, nn.Module):
            seen.setdefault(id(m), m)
    return list(seen.values())


@contextlib.contextmanager
def capture(model: nn.Module, *, detach: bool = True) -> Iterator[Capture]:
    """Record what each forward of `model` (or the GroundingDINO inside it) feeds to a loss."""
    gd = find_groundingdino(model)
    cap = Capture()
    state = {"active": False, "in_transformer": False}
    keep = (lambda t: t.detach()) if detach else (lambda t: t)
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def rec() -> ForwardRecord:
        return cap.records[-1]

    def root_pre(_m: nn.Module, _args: Any) -> None:
        state["active"] = True
        cap.records.append(ForwardRecord(num_queries=int(getattr(gd, "num_queries", 0))))

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
            rec().layer_deltas.append(keep(output))

    try:
        handles.append(gd.register_forward_pre_hook(root_pre))
        handles.append(gd.register_forward_hook(root_post, always_call=True))
        handles.append(gd.bert.register_forward_pre_hook(bert_pre, with_kwargs=True))
        handles.append(gd.transformer.register_forward_pre_hook(transformer_pre, with_kwargs=True))
        handles.append(gd.transformer.register_forward_hook(transformer_post))
        class_mods = _unique(list(gd.class_embed) + [getattr(gd.transformer, "enc_out_class_embed", None)])
        for m in class_mods:
            handles.append(m.register_forward_hook(class_post))
        for m in _unique(gd.bbox_embed):
            handles.append(m.register_forward_hook(bbox_post))
        yield cap
    finally:
        for h in handles:
            h.remove()


make_callable(__name__)  # `nanscope.capture(model)` works after `import nanscope.capture` too
