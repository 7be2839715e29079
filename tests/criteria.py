"""Small criteria written independently of nanscope, for --criterion tests (DETR convention).

Targets go to the first N queries (no matching): enough to show whether padded positions reach the loss.
"""

from __future__ import annotations

import torch
from torchvision.ops import sigmoid_focal_loss


def _targets(outputs, targets):
    lg = outputs["pred_logits"]
    t = torch.zeros_like(lg)
    for i, tg in enumerate(targets):
        n = tg["positive_map"].shape[0]
        t[i, :n] = (tg["positive_map"] > 0).to(lg.dtype)
    return lg, t


def unmasked(outputs, targets):
    """Focal loss over all 256 columns: NaN on -inf padding."""
    lg, t = _targets(outputs, targets)
    return {"loss_ce": sigmoid_focal_loss(lg, t, reduction="sum")}


def masked(outputs, targets):
    """Focal loss over valid text positions only (torch.masked_select, as MMDetection does)."""
    lg, t = _targets(outputs, targets)
    m = outputs["text_token_mask"]
    valid = torch.zeros(lg.shape[0], lg.shape[-1], dtype=torch.bool, device=lg.device)
    valid[:, : m.shape[1]] = m
    valid = valid[:, None, :].expand_as(lg)
    return {"loss_ce": sigmoid_focal_loss(torch.masked_select(lg, valid), torch.masked_select(t, valid),
                                          reduction="sum")}


class Raises:
    def __call__(self, outputs, targets):
        raise ValueError("boom in user criterion")
