"""What the tracer finds: the frame, infinity source and origin records, and the trace's result.

A leaf module: `nanscope.trace.tracer` (the entry point) and `nanscope.trace._rules` (the op rules) both
read these, so the package imports in one direction: tracer -> _mode -> _rules -> records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Frame:
    """The innermost Python frame outside torch, torchvision, the standard library and this tracer."""

    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{short_path(self.file)}:{self.line} in {self.function}"


@dataclass(frozen=True)
class InfSource:
    """An op that wrote infinities: on purpose (`intentional`) or an inf origin."""

    op: str  # aten overload, e.g. "aten.masked_fill_.Scalar"
    module: str | None  # path from the root module ("" is the root), None outside any module
    module_type: str | None  # e.g. "ContrastiveEmbed"
    frame: Frame | None
    index: int  # op sequence number of its first occurrence
    phase: str  # "forward" | "backward"
    intentional: bool  # an infinite scalar argument, an infinite buffer or 0-dim constant
    source: str | None = None  # "buffer x.y" when the infinities came from a buffer


@dataclass(frozen=True)
class Origin:
    """The first op of a phase whose output holds NaN (or inf) while its inputs held none."""

    phase: str  # "forward" | "backward"
    op: str  # aten overload, e.g. "aten.binary_cross_entropy_with_logits.default"
    module: str | None  # innermost module path from the root ("" is the root), None: outside (loss code)
    module_type: str | None
    kind: str  # "nan" | "inf"
    nan_count: int  # in the output, read when the op's batch of flags was read (<= 256 ops later)
    inf_count: int
    shape: tuple[int, ...]
    dtype: str
    first_indices: tuple[tuple[int, ...], ...]  # up to 3 positions of the first NaN (or inf) values
    frame: Frame | None  # forward: where the op ran; backward: where the forward op whose backward ran was called
    index: int  # op sequence number over forward + loss + backward
    grad_fn: str | None = None  # backward: the autograd node that ran the op, e.g. "MulBackward0"
    source: str | None = None  # the input that was already non-finite when it entered, e.g. "parameter x.w"
    inf_from: InfSource | None = None  # where the infinities this op turned into NaN were written

    @property
    def where(self) -> str:
        """`module transformer.decoder.layers.0 (DeformableTransformerDecoderLayer)` or `loss code`."""
        if self.module is None:
            return "outside any module (loss code)"
        name = self.module or "the root module"
        return f"{name} ({self.module_type})" if self.module_type else name


@dataclass(frozen=True)
class TraceResult:
    forward: Origin | None  # the earliest forward origin (NaN or unintended inf)
    backward: Origin | None  # the earliest backward origin
    loss_finite: bool
    ops_seen: int
    origins: tuple[Origin, ...] = ()  # every origin found: first NaN and first inf per phase, in op order
    intentional_inf_sources: tuple[InfSource, ...] = ()  # deliberate -inf writes (forward), first seen first
    backward_traced: bool = False  # False: asked not to, the loss has no graph, or no parameter trains
    module_calls: int = 0  # module calls seen by the module-level pass (0: it did not run)
    replayed: tuple[str, ...] = ()  # modules whose flagged calls were replayed under the op-level mode
    replayed_backward: tuple[str, ...] = ()  # modules whose call's backward was replayed to name a backward origin
    full_trace_reason: str | None = None  # why the whole step was traced op by op (None: two phases sufficed)

    @property
    def clean(self) -> bool:
        return self.forward is None and self.backward is None and self.loss_finite


def short_path(path: str) -> str:
    """Relative to the working directory when below it, else after the last site-packages."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        rel = path
    if not rel.startswith(".."):
        return rel
    marker = f"-packages{os.sep}"
    return path.split(marker, 1)[1] if marker in path else path
