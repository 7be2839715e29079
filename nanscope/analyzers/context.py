"""What analyzers read: one replayed batch, as captured. Analyzers never mutate it.

Fields that a run could not provide are None; an analyzer declares the fields it `needs` and is
skipped when they are missing (e.g. no `loss_terms` without --criterion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from nanscope.replay.batch import Batch
from nanscope.replay.positive_map import MAX_TEXT_LEN, TextInfo


@dataclass
class AnalysisContext:
    batch: Batch
    texts: list[TextInfo]  # per image: tokens and positive maps
    max_text_len: int = MAX_TEXT_LEN
    # From the capture of one forward (nanscope.stacks.capture.ForwardRecord); None when no model ran.
    record: Any = None
    logits: dict[str, torch.Tensor] | None = None  # layer name ('dec0'.., 'enc') -> [B, Q, T]
    boxes: dict[str, torch.Tensor] | None = None  # layer name -> [B, Q, 4] cxcywh
    text_mask: torch.Tensor | None = None  # [B, T] bool, padded with False to max_text_len
    # The model and checkpoint, and the stack (nanscope.stacks.base.Stack) that built them.
    model: Any = None
    stack: Any = None
    state_dict: Mapping[str, torch.Tensor] | None = None
    key_fit: Any = None  # nanscope.stacks.formats.checkpoint.KeyFit
    # The user's criterion, when given (--criterion): its terms on the captured outputs, and the same
    # criterion on outputs whose padded logits were replaced by a finite value (the counterfactual that
    # tells whether padding causes a non-finite term).
    criterion_name: str | None = None
    loss_terms: Mapping[str, torch.Tensor] | None = None
    loss_terms_padding_sanitized: Mapping[str, torch.Tensor] | None = None
    # Optional passes.
    trace: Any = None  # nanscope.trace.tracer.TraceResult
    module_stats: Any = None  # per-module activation magnitudes, for half-precision checks
    supervision: Any = None  # nanscope.replay.supervision.SupervisionProbe of the user's criterion
    autocast_dtype: torch.dtype | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def phrase_of(self, image: int, box: int) -> str:
        boxes = self.texts[image].boxes
        return boxes[box].phrase if 0 <= box < len(boxes) else ""

    def token_text(self, image: int, token: int) -> str:
        return self.texts[image].token_text(token)
