"""Sigmoid focal loss over the valid text positions only, in three variants.

`binary_cross_entropy_with_logits(-inf, t)` is NaN for t = 0 and t = 1, and so is its gradient;
multiplying by a 0/1 mask afterwards keeps the NaN. So padded positions must never reach the loss:

- `focal_sum_masked_select`: the reference (MMDetection, Open-GroundingDino, transformers):
  `torch.masked_select` keeps the valid positions. Its output size depends on the data, so it
  synchronizes with the device and breaks `torch.compile` graphs.
- `focal_sum_syncfree`: sanitize invalid logits to 0 with `torch.where` *before* the loss, then
  multiply the per-position loss by the mask. Shapes never depend on data: no `.item()`, no
  `nonzero`, no `masked_select`; compiles with `fullgraph=True`.
- `focal_sum_naive`: every column, as the code that NaNs does.

All return the plain sum; the caller divides by its normalizer.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss


def focal_terms(logits: Tensor, targets: Tensor, valid: Tensor, *, alpha: float = 0.25,
                gamma: float = 2.0) -> Tensor:
    """Per-position focal loss, exactly 0 (and finite) at invalid positions.

    Args:
        logits: [..., T] float, may be -inf (or anything) where `valid` is False.
        targets: [..., T] 0/1, same shape as `logits`.
        valid: bool, broadcastable to `logits` (e.g. [B, 1, T]).

    Returns:
        [..., T] float, same shape as `logits`.
    """
    safe = torch.where(valid, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    return sigmoid_focal_loss(safe, targets.to(logits.dtype), alpha=alpha, gamma=gamma) * valid


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
