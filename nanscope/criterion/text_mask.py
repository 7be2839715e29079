"""Which text positions of a GroundingDINO output are real tokens.

GroundingDINO's `ContrastiveEmbed` writes `-inf` where `text_token_mask` is False and pads the
logits to `max_text_len` (256) columns with `-inf`. The valid positions are read from
`outputs["text_token_mask"]` when the model returns it, otherwise from the logits themselves.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from nanscope.errors import InputError

ValiditySource = Literal["text_token_mask", "logits"]


def pad_text_mask(mask: Tensor, width: int) -> Tensor:
    """Pad a `[B, L]` bool text mask with False to `[B, width]` (L <= width)."""
    if mask.dim() == 3:  # transformers' text_mask: [B, Q, T], the same row for every query
        mask = mask[:, 0, :]
    if mask.dim() != 2:
        raise InputError(f"text_token_mask must be [batch, tokens]; got shape {tuple(mask.shape)}")
    mask = mask.bool()
    length = mask.shape[1]
    if length > width:
        raise InputError(
            f"text_token_mask has {length} tokens but pred_logits only {width} columns; "
            f"expected at most {width} (the model truncates text to max_text_len)"
        )
    if length == width:
        return mask
    return torch.nn.functional.pad(mask, (0, width - length), value=False)


def text_validity(outputs: Mapping[str, Any]) -> tuple[Tensor, ValiditySource]:
    """The valid text positions of `outputs` and where they were read from.

    Args:
        outputs: needs "pred_logits" [B, Q, T]; "text_token_mask" [B, L] bool (L <= T) is used when
            present. Without it, a column is invalid where its logits are -inf for every query.

    Returns:
        (valid [B, T] bool, "text_token_mask" | "logits")
    """
    logits = outputs["pred_logits"]
    mask = outputs.get("text_token_mask")
    if mask is not None:
        return pad_text_mask(mask.to(logits.device), logits.shape[-1]), "text_token_mask"
    return ~torch.isneginf(logits).all(dim=1), "logits"


def text_width(outputs: Mapping[str, Any]) -> int:
    """How many leading columns can hold valid positions, known from shapes alone (no device sync).

    With a `[B, L]` text_token_mask every column past L is padding, so losses and costs may work on
    `pred_logits[..., :L]`; without one, all T columns.
    """
    mask = outputs.get("text_token_mask")
    width = outputs["pred_logits"].shape[-1]
    if mask is not None and mask.dim() == 2:
        return min(mask.shape[1], width)
    return width
