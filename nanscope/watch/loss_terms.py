"""The per-term losses a forward returned: a criterion's dict, transformers' `loss_dict`, MMDetection's `mode='loss'`.

`loss_terms(output)` returns `{name: 0-dim tensor}`, `None` when the output carries a loss slot that is
empty this call (transformers' model called without `labels`), and raises `InputError` naming what
was found when the output has no loss terms at all (attach() was given an object that returns none).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from nanscope.errors import InputError


def _as_term(value: Any) -> Tensor | None:
    """A tensor, or MMDetection's list of per-level tensors (summed by its parse_losses), as one tensor."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
        return sum(v.float().sum() for v in value)  # type: ignore[return-value]
    return None


def _from_mapping(out: Mapping[Any, Any]) -> dict[str, Tensor]:
    """Keys naming a loss (MMDetection also returns accuracies), else every 0-dim float tensor."""
    found = {str(k): t for k, t in ((k, _as_term(v)) for k, v in out.items())
             if t is not None and t.is_floating_point()}
    named = {k: t for k, t in found.items() if "loss" in k}
    return named or {k: t for k, t in found.items() if t.numel() == 1}


_ABSENT = object()


def loss_terms(output: Any, *, where: str) -> dict[str, Tensor] | None:
    """The loss terms in `output`; `where` names the object (for the error message)."""
    if isinstance(output, Tensor):
        if output.numel() == 1 and output.is_floating_point():
            return {"loss": output}
        raise InputError(f"{where} returned a tensor of shape {list(output.shape)}; expected a 0-dim loss, a dict "
                         "of loss terms, or a model output with loss_dict")
    loss_dict = getattr(output, "loss_dict", _ABSENT)
    if isinstance(loss_dict, Mapping) and _from_mapping(loss_dict):
        return _from_mapping(loss_dict)
    if loss_dict is None:  # transformers' output called without labels: no loss this call
        return None
    if isinstance(output, Mapping):
        terms = _from_mapping(output)
        if terms:
            return terms
        keys = ", ".join(str(k) for k in list(output)[:8])
        raise InputError(f"{where} returned a dict without loss terms (keys: {keys or 'none'}); expected loss "
                         "terms such as {'loss_ce': 0-dim tensor, 'loss_bbox': 0-dim tensor}. Attach to the "
                         "criterion, or to a model that computes its loss")
    raise InputError(f"{where} returned a {type(output).__name__}, which carries no loss terms; expected a 0-dim "
                     "loss, a dict of loss terms, or a model output with loss_dict (a transformers GroundingDino "
                     "called with labels, an MMDetection model in mode='loss'). Attach to the criterion instead")
