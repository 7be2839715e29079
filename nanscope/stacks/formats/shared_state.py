"""One copy of the weights: a loaded checkpoint's tensors replaced by the model's own where they hold the same values.

A stack keeps "what the checkpoint held" beside the model (`LoadedModel.state_dict`) for the analyzers
that read the file's own tensors (NS305 counts its non-finite values, also in tensors the model did
not load). Kept as read, that is a second copy of every weight for the whole run: at full size
(SwinT-OGC, 247 MiB of weights) it was all of `nanscope inspect`'s peak memory over a bare
build + load + forward (issue 28). After loading, most tensors are equal to the parameter they were
copied into, so the model's tensor can stand for them; only tensors the model does not hold, holds
with other values (a NaN never equals itself, a tied group loaded from differing copies) or holds in
a narrower dtype stay the checkpoint's own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# (checkpoint dtype, model dtype) pairs whose conversion is exact: every value, NaN and +-inf included,
# survives it, so the model's tensor has the same non-finite count as the file's.
EXACT_WIDENING = {
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float64),
    (torch.float16, torch.float64), (torch.bfloat16, torch.float64),
}


def _same_values(file_t: torch.Tensor, own: torch.Tensor) -> bool:
    """Whether `own` (the model's tensor) holds exactly `file_t`'s values (NaNs never count as equal)."""
    if file_t.shape != own.shape or any(t.is_sparse or t.is_quantized or t.is_meta for t in (file_t, own)):
        return False
    if file_t.dtype != own.dtype and (file_t.dtype, own.dtype) not in EXACT_WIDENING:
        return False
    return bool(torch.equal(file_t.to(device=own.device, dtype=own.dtype), own))


def share_with_model(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a checkpoint's tensors under the model's key names) with every tensor the model holds
    the same values of replaced by the model's own (detached, sharing its storage and device), so the
    file's copy can be freed. Call it after the model is loaded and moved to its device.

    The result has the same keys in the same order, and every tensor keeps its count of NaN and
    +-inf values; tensors the model lacks or holds differently are the checkpoint's own."""
    own = model.state_dict()  # detached views of the parameters and persistent buffers
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        mine = own.get(key)
        shared = isinstance(value, torch.Tensor) and isinstance(mine, torch.Tensor) and _same_values(value, mine)
        out[key] = mine if shared else value  # type: ignore[assignment]
    return out
