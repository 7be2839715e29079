"""The Hugging Face form of a batch: what a GroundingDino processor + collator hands the model.

    pixel_values    Tensor [B, 3, H, W] float, already normalized by the processor
    input_ids       Tensor [B, L] integer token ids ([CLS] ... [SEP], then padding)
    attention_mask  Tensor [B, L] 0/1 (1 on real tokens)
    token_type_ids  optional Tensor [B, L]
    pixel_mask      optional Tensor [B, H, W] 0/1 (1 on real pixels, 0 on padding)
    labels          list of B dicts: class_labels LongTensor [N] (the index of the box's '.'-separated
                    phrase in its caption, as transformers' loss reads it) and boxes [N, 4] normalized cxcywh

`validate_hf_batch` checks the structure with the same field-and-index messages as the schema
(`labels[1].boxes has shape [3, 5]; expected [N, 4]`); it needs no tokenizer. `to_batch` turns it into
nanscope's `Batch` with the model's tokenizer: each caption is decoded from its input ids and must
tokenize back to the same ids, and each class label becomes the character span of its phrase. A class
label past the caption's phrases is kept (transformers' loss raises IndexError on it; NS112 names it)
with an empty span, so its positive-map row is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from nanscope.errors import BatchError
from nanscope.replay.batch import Batch, Target

HF_KEYS = ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "pixel_mask", "labels")


@dataclass(frozen=True)
class HfBatch:
    pixel_values: torch.Tensor  # [B, 3, H, W] float
    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] bool
    labels: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per image (class_labels [N] int64, boxes [N, 4])
    pixel_mask: torch.Tensor | None = None  # [B, H, W] bool, True on real pixels
    source: str = ""

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])


def is_hf_batch(raw: Any) -> bool:
    return isinstance(raw, Mapping) and "pixel_values" in raw and "input_ids" in raw


def _tensor(raw: Mapping[str, Any], key: str, shape: str) -> torch.Tensor:
    v = raw[key]
    if not isinstance(v, torch.Tensor):
        raise BatchError(f"{key} is a {type(v).__name__}; expected a tensor {shape}")
    return v


def validate_hf_batch(raw: Mapping[str, Any], source: str = "batch") -> HfBatch:
    """Check the HF form and return an `HfBatch`; raise `BatchError` naming the field and index."""
    pv = _tensor(raw, "pixel_values", "[B, 3, H, W]")
    if pv.dim() != 4 or pv.shape[1] != 3 or not pv.is_floating_point():
        raise BatchError(f"pixel_values has shape {list(pv.shape)} and dtype {pv.dtype}; expected float [B, 3, H, W]")
    b, h, w = int(pv.shape[0]), int(pv.shape[2]), int(pv.shape[3])
    ids = _tensor(raw, "input_ids", f"[{b}, L]")
    if ids.dim() != 2 or ids.shape[0] != b or ids.is_floating_point() or ids.dtype == torch.bool:
        raise BatchError(f"input_ids has shape {list(ids.shape)} and dtype {ids.dtype}; expected integer [{b}, L]")
    mask = raw.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    elif not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        raise BatchError(f"attention_mask has shape {list(getattr(mask, 'shape', []))}; expected {list(ids.shape)} "
                         "like input_ids")
    elif not bool(((mask == 0) | (mask == 1)).all()):
        raise BatchError("attention_mask holds values other than 0 and 1; expected 1 on real tokens, 0 on padding")
    pixel_mask = raw.get("pixel_mask")
    if pixel_mask is not None:
        if not isinstance(pixel_mask, torch.Tensor) or tuple(pixel_mask.shape) != (b, h, w):
            raise BatchError(f"pixel_mask has shape {list(getattr(pixel_mask, 'shape', []))}; expected [{b}, {h}, {w}] "
                             "(1 on real pixels)")
        pixel_mask = pixel_mask.bool()
    labels = raw.get("labels")
    if labels is None:
        raise BatchError(f"{source} has pixel_values and input_ids but no labels; expected labels: a list of {b} "
                         "dicts with class_labels and boxes")
    if not isinstance(labels, Sequence) or len(labels) != b:
        n = len(labels) if isinstance(labels, Sequence) else type(labels).__name__
        raise BatchError(f"labels has {n} entries; expected a list of {b} dicts (one per image)")
    out = []
    for i, lab in enumerate(labels):
        if not isinstance(lab, Mapping) or "class_labels" not in lab or "boxes" not in lab:
            raise BatchError(f"labels[{i}] is not a dict with 'class_labels' and 'boxes'")
        boxes = torch.as_tensor(lab["boxes"], dtype=torch.float32)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise BatchError(f"labels[{i}].boxes has shape {list(boxes.shape)}; expected [N, 4]")
        cls = torch.as_tensor(lab["class_labels"])
        if cls.is_floating_point() or cls.dtype == torch.bool:
            raise BatchError(f"labels[{i}].class_labels has dtype {cls.dtype}; expected integers (phrase indices)")
        cls = cls.reshape(-1).long()
        if cls.shape[0] != boxes.shape[0]:
            raise BatchError(f"labels[{i}].class_labels has {cls.shape[0]} entries for {boxes.shape[0]} boxes; "
                             "expected one per box")
        out.append((cls, boxes))
    return HfBatch(pv.float(), ids.long(), mask.bool(), tuple(out), pixel_mask, source)


def _phrase_spans(enc: Any, label_map: torch.Tensor) -> list[tuple[int, int]]:
    """Character span of each label-map row (phrase): from its first token's start to its last token's end."""
    spans = []
    for row in label_map:
        toks = row.nonzero().flatten().tolist()
        first, last = enc.token_to_chars(toks[0]), enc.token_to_chars(toks[-1])
        spans.append((int(first[0]), int(last[1])))
    return spans


def to_batch(hf: HfBatch, tokenizer: Any) -> Batch:
    """nanscope's Batch for an HF batch: captions decoded from input_ids, class labels as phrase spans."""
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    captions, targets = [], []
    for i in range(len(hf)):
        ids = hf.input_ids[i][hf.attention_mask[i]]
        caption = tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()
        enc = tokenizer(caption)
        if list(enc["input_ids"]) != ids.tolist():
            raise BatchError(f"input_ids[{i}] decodes to {caption[:80]!r}, which the tokenizer encodes to other ids "
                             f"({len(enc['input_ids'])} vs {len(ids)} tokens); nanscope cannot rebuild this caption - "
                             "save the batch in nanscope's schema (captions + phrases) instead")
        label_map = build_label_maps(torch.zeros(1, 1, len(ids)), ids[None])[0]  # [n_phrases, L]
        phrase_spans = _phrase_spans(enc, label_map)
        cls, boxes = hf.labels[i]
        spans = tuple((phrase_spans[c],) if 0 <= c < len(phrase_spans) else () for c in cls.tolist())
        captions.append(caption)
        targets.append(Target(boxes=boxes, phrases=None, spans=spans, class_labels=tuple(cls.tolist())))
    masks = None if hf.pixel_mask is None else ~hf.pixel_mask
    return Batch(images=hf.pixel_values, captions=tuple(captions), targets=tuple(targets), source=hf.source,
                 image_masks=masks)


def hf_batch_dict(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The HF keys of a batch on CPU (for a watch dump), and notes naming what was dropped."""
    out: dict[str, Any] = {}
    for k in HF_KEYS:
        v = raw.get(k)
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu()
    labels = raw.get("labels")
    if isinstance(labels, Sequence):
        out["labels"] = [{k: torch.as_tensor(lab[k]).detach().cpu() for k in ("class_labels", "boxes") if k in lab}
                         for lab in labels if isinstance(lab, Mapping)]
    dropped = sorted(str(k) for k in raw if k not in HF_KEYS)
    return out, ([f"dropped batch keys: {', '.join(dropped)}"] if dropped else [])
