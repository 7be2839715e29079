"""Sigmoid focal loss over the valid text positions only, in three variants.

`binary_cross_entropy_with_logits(-inf, t)` is NaN for t = 0 and t = 1, and so is its gradient;
multiplying by a 0/1 mask afterwards keeps the NaN. So padded positions must never reach the loss:

- `focal_sum_masked_select`: the reference (MMDetection, Open-GroundingDino, transformers):
  `torch.masked_select` keeps the valid positions. Its output size depends on the data, so it
  synchronizes with the device and breaks `torch.compile` graphs.
- `focal_sum_syncfree`: sanitize invalid logits to 0 with `torch.where` *before* the loss, then
  multiply the per-position loss by the mask (folded into the alpha weight). Shapes never depend on data: no `.item()`, no
  `nonzero`, no `masked_select`; compiles with `fullgraph=True`.
- `focal_sum_naive`: every column, as the code that NaNs does.

All return the plain sum; the caller divides by its normalizer.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import binary_cross_entropy_with_logits
from torchvision.ops import sigmoid_focal_loss


def focal_terms(logits: Tensor, targets: Tensor, valid: Tensor, *, alpha: float = 0.25,
                gamma: float = 2.0) -> Tensor:
    """Per-position focal loss, exactly 0 (and finite, with a 0 gradient) at invalid positions.

    The formula of `torchvision.ops.sigmoid_focal_loss` written for 0/1 targets with `torch.where`
    (p_t and alpha_t are selections, not blends): about a third fewer passes over the tensor, so the
    masked loss costs no more than the naive one.

    Args:
        logits: [..., T] float, may be -inf (or anything) where `valid` is False.
        targets: [..., T] 0/1, same shape as `logits`.
        valid: bool, broadcastable to `logits` (e.g. [B, 1, T]).

    Returns:
        [..., T] float, same shape as `logits`.
    """
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    x = torch.where(valid, logits, zero)  # sanitize before the loss: NaN * 0 would stay NaN
    t = targets.to(logits.dtype)
    positive = t > 0
    p = torch.sigmoid(x)
    ce = binary_cross_entropy_with_logits(x, t, reduction="none")
    one_minus_pt = torch.where(positive, 1 - p, p)
    alpha_t = (1 - alpha) + (2 * alpha - 1) * t if alpha >= 0 else torch.ones_like(t)
    weight = torch.where(valid, alpha_t, zero)
    return ce * one_minus_pt**gamma * weight


def focal_sum_syncfree(logits: Tensor, targets: Tensor, valid: Tensor, *, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Sum of the focal loss over valid positions; shapes as in `focal_terms`. Returns a 0-dim tensor."""
    return focal_terms(logits, targets, valid, alpha=alpha, gamma=gamma).sum()


def focal_sum_masked_select(logits: Tensor, targets: Tensor, valid: Tensor, *, alpha: float = 0.25,
                            gamma: float = 2.0) -> Tensor:
    """The reference: `masked_select` the valid positions, then the focal loss. Returns a 0-dim tensor."""
    valid = valid.expand_as(logits)
    x = torch.masked_select(logits, valid)
    t = torch.masked_select(targets.to(logits.dtype), valid)
    return sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="sum")


def focal_sum_naive(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Every column, padded ones included: NaN as soon as one logit is -inf. Returns a 0-dim tensor."""
    return sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="sum")
