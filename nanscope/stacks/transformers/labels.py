"""transformers' view of a caption: '.'-separated phrases (label maps) and the class label of each box.

transformers' GroundingDino loss does not take positive maps: `build_label_maps(logits, input_ids)`
splits the token ids at [CLS], [SEP], '.', '?' and padding into phrases, one binary row per phrase
[n_phrases, max_text_len], and a box's `class_labels` entry indexes its phrase. nanscope calls that
function on each caption's ids (cut at max_text_len, as the model sees them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def label_map(info: Any) -> Tensor:
    """[n_phrases, max_text_len] long: transformers' label map of one caption (`TextInfo`)."""
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    width = int(info.max_text_len)
    ids = torch.tensor(list(info.input_ids)[:width], dtype=torch.long)
    return build_label_maps(torch.zeros(1, 1, width), ids[None])[0]


def phrase_of_token(lm: Tensor, token: int) -> int | None:
    """The phrase (label-map row) holding token position `token`, or None."""
    if token >= lm.shape[1]:
        return None
    rows = lm[:, token].nonzero().flatten().tolist()
    return int(rows[0]) if rows else None


def class_labels(target: Any, info: Any, lm: Tensor) -> Tensor:
    """[N] long: the batch's own class labels, else the phrase holding each box's first kept token.

    A box whose tokens fall in no phrase gets `len(lm)`, one past the last row: transformers' loss
    raises IndexError on it, as it would on such a label in training.
    """
    if target.class_labels is not None:
        return torch.tensor(target.class_labels, dtype=torch.long)
    out = []
    for bt in info.boxes:
        phrase = phrase_of_token(lm, bt.kept[0]) if bt.kept else None
        out.append(len(lm) if phrase is None else phrase)
    return torch.tensor(out, dtype=torch.long)


def offset_rows(label_maps: list[Tensor], labels: list[Tensor]) -> list[list[dict[str, int | bool | None]]]:
    """Which label-map row transformers' `_get_target_classes_one_hot` gives each box, per image.

    It offsets image i's class labels by `len(label_maps[i])` (for i > 0) into the concatenated maps,
    while the right offset is the number of phrases of images 0..i-1. Per box: `row` (what it uses;
    None past the end: IndexError), `right` (what it should use), `image`/`phrase` the row belongs to,
    `same` whether the two rows are equal (then the loss is unaffected).
    """
    rows = torch.cat(label_maps) if label_maps else torch.zeros(0, 0)
    owners = [(i, p) for i, lm in enumerate(label_maps) for p in range(len(lm))]
    starts = [sum(len(lm) for lm in label_maps[:i]) for i in range(len(label_maps))]
    out = []
    for i, (lm, cls) in enumerate(zip(label_maps, labels)):
        per = []
        for c in cls.tolist():
            right = starts[i] + c if 0 <= c < len(lm) else None
            used = c + (len(lm) if i > 0 else 0)
            if not 0 <= used < len(rows):
                per.append({"class": c, "row": None, "right": right, "image": None, "phrase": None, "same": False})
                continue
            same = right is not None and bool(torch.equal(rows[used], rows[right]))
            img, phrase = owners[used]
            per.append({"class": c, "row": used, "right": right, "image": img, "phrase": phrase, "same": same})
        out.append(per)
    return out
