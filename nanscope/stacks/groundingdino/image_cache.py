"""Image features a `groundingdino` provider caches on the model, dropped around each replayed forward.

rf-groundingdino 0.3.0's `GroundingDINO` adds `set_image_tensor(samples)` (runs the backbone and keeps
`self.features`, `self.poss` on the model), `unset_image_tensor()` (deletes them) and a forward that runs
the backbone only when no features are kept (`if not hasattr(self, 'features') ...`) and deletes them at its
end unless called with `unset_image_tensor=False`. Features left on the model (by a user's inference code,
or by a forward that raised before its end) are therefore used by the next forward whatever images it is
given: a replay of batch B would run on batch A's backbone features. groundingdino-py has no such cache.

`fresh_image_features(model)` calls the provider's own `unset_image_tensor()` on entry and on exit (also on
exceptions): the forward inside computes its own batch's features, and none of the replay's stay behind.
A model without the method is left untouched.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

CACHE_ATTRS = ("features", "poss")  # what rf-groundingdino's set_image_tensor keeps on the model


def caches_image_features(model: nn.Module) -> bool:
    """True when the provider's GroundingDINO keeps backbone features between forwards."""
    return callable(getattr(model, "unset_image_tensor", None))


def has_cached_features(model: nn.Module) -> bool:
    return any(hasattr(model, a) for a in CACHE_ATTRS)


def clear_image_features(model: nn.Module) -> None:
    """Drop cached features with the provider's own `unset_image_tensor()` (a no-op for other providers)."""
    if caches_image_features(model):
        model.unset_image_tensor()


@contextlib.contextmanager
def fresh_image_features(model: nn.Module) -> Iterator[None]:
    """No cached image features while the block starts, nor after it ends (also on exceptions)."""
    clear_image_features(model)
    try:
        yield
    finally:
        clear_image_features(model)
