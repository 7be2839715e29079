"""What nanscope hands a user's criterion besides the outputs: targets under the names public trainers
read, and the values of the extra parameters their criteria and matchers take (docs/criterion-protocol.md).

Targets, per image (the documented keys; the batch's own `extra` keys come first and are overridden):
    boxes [N, 4] cxcywh normalized; positive_map and token_labels [N, T] 0/1 (the same tensor);
    labels and class_labels [N] int64: the index of the box's category in `cat_list[i]`;
    caption (str); phrases (N str); tokens_positive (N lists of [begin, end] character spans).
A category is a phrase with its tokens: `cat_list[i]` lists them in order of first appearance and
`label_map[i][labels[j]]` equals `positive_map[j]` (Open-GroundingDino's `label_map[tgt_ids]`).

Named extras (filled by parameter name, see `nanscope.user_code`): cat_list / cap_list, caption /
captions (the batch's captions), label_map / label_maps (per image [C_i, T]), tokenizer. A matcher is
called per image, so there `label_map` is that image's [C, T] tensor and the lists hold one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from nanscope.replay.positive_map import TextInfo

PER_BOX = ("boxes", "positive_map", "token_labels", "labels", "class_labels", "phrases", "tokens_positive")
EXTRA_NAMES = ("cat_list", "cap_list", "caption", "captions", "label_map", "label_maps", "tokenizer")


@dataclass(frozen=True)
class Categories:
    """One image's categories: `names` (cat_list), each box's index into them, and their rows [C, T]."""

    names: tuple[str, ...]
    labels: tuple[int, ...]
    label_map: Tensor  # [C, T]


def categories(info: TextInfo) -> Categories:
    """Boxes with the same phrase and the same tokens share a category (first appearance order)."""
    keys: dict[tuple[str, tuple[int, ...]], int] = {}
    rows: list[int] = []
    labels = []
    for j, bt in enumerate(info.boxes):
        key = (bt.phrase, bt.kept)
        if key not in keys:
            keys[key] = len(keys)
            rows.append(j)
        labels.append(keys[key])
    names = tuple(k[0] for k in keys)
    label_map = info.positive_map[rows] if rows else info.positive_map.new_zeros(0, info.positive_map.shape[-1])
    return Categories(names, tuple(labels), label_map)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def criterion_targets(batch: Any, texts: Sequence[TextInfo], device: torch.device) -> list[dict[str, Any]]:
    """The targets of every image (see the module docstring for the keys)."""
    out = []
    for t, info in zip(batch.targets, texts):
        cats = categories(info)
        pm = info.positive_map.to(device)
        labels = torch.tensor(cats.labels, dtype=torch.int64, device=device)
        out.append({
            **_to(dict(getattr(t, "extra", None) or {}), device),
            "boxes": t.boxes.to(device), "positive_map": pm, "token_labels": pm,
            "labels": labels, "class_labels": labels, "caption": info.caption,
            "phrases": [b.phrase for b in info.boxes],
            "tokens_positive": [[list(s) for s in b.spans] for b in info.boxes],
        })
    return out


def criterion_extras(texts: Sequence[TextInfo], tokenizer: Any, device: torch.device) -> dict[str, Any]:
    """Values of the named extra parameters for a call on the whole batch."""
    cats = [categories(i) for i in texts]
    names = [list(c.names) for c in cats]
    captions = [i.caption for i in texts]
    maps = [c.label_map.to(device) for c in cats]
    return {"cat_list": names, "cap_list": names, "caption": captions, "captions": captions,
            "label_map": maps, "label_maps": maps, "tokenizer": tokenizer}


def image_extras(extras: Mapping[str, Any], i: int) -> dict[str, Any]:
    """The extras of image `i` alone, for a matcher called per image (`label_map` is its [C, T] tensor)."""
    out = dict(extras)
    for key in ("cat_list", "cap_list", "caption", "captions", "label_maps"):
        if key in out:
            out[key] = [out[key][i]]
    if "label_map" in out:
        out["label_map"] = out["label_map"][i]
    return out


def restrict_extras(extras: Mapping[str, Any], cols: Tensor) -> dict[str, Any]:
    """The extras for outputs cut to the text columns `cols` [K] (check 6's unpadded batch)."""
    out = dict(extras)
    for key in ("label_map", "label_maps"):
        if key in out:
            out[key] = [m.index_select(-1, cols.to(m.device)) for m in out[key]]
    return out


def with_positive_map(target: Mapping[str, Any], positive_map: Tensor) -> dict[str, Any]:
    """A copy of `target` with a new positive map (and `token_labels`, its alias)."""
    return {**target, "positive_map": positive_map, "token_labels": positive_map}


def select_boxes(target: Mapping[str, Any], keep: Tensor) -> dict[str, Any]:
    """A copy of `target` with only the boxes where `keep` [N] bool is True, in every per-box key."""
    idx = keep.nonzero().flatten().tolist()
    out = dict(target)
    for key in PER_BOX:
        v = target.get(key)
        if isinstance(v, Tensor):
            out[key] = v[keep.to(v.device)]
        elif isinstance(v, list):
            out[key] = [v[k] for k in idx]
    if "token_labels" in out and "positive_map" in out and target.get("token_labels") is target.get("positive_map"):
        out["token_labels"] = out["positive_map"]
    if "class_labels" in out and target.get("class_labels") is target.get("labels"):
        out["class_labels"] = out["labels"]
    return out
