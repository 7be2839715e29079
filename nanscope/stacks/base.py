"""The stack seam: what every GroundingDINO model family (groundingdino-py, transformers, ...) provides.

`inspect`, `verify-fix`, `watch` and the analyzers talk to a `Stack`, never to a model library directly.
A stack knows how to find its model inside wrappers, build it and load a checkpoint (with the key-fit
report), turn a batch into the model's call, capture what the loss sees per forward, build criterion
targets, name its own reference criterion, and write the weights and facts a watch dump needs.

Adding a stack: subclass `Stack`, implement the abstract methods, and add it to `STACKS` in
`nanscope/stacks/__init__.py` (see docs/extending.md, "Adding a stack").
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager

import torch
from torch import Tensor, nn

from nanscope.stacks.capture import Capture
from nanscope.stacks.formats.checkpoint import KeyFit

PathLike = str | os.PathLike[str]


WRAPPER_ATTRS = ("_orig_mod", "module", "base_model", "model")  # torch.compile, DDP, PEFT, PEFT's inner model


def find_wrapped(model: nn.Module, is_target: Callable[[Any], bool]) -> nn.Module | None:
    """The first module `is_target` accepts: `model` itself, down its wrapper attributes (DDP `module`, PEFT
    `base_model.model`, torch.compile `_orig_mod`), else any submodule; None when there is none."""
    seen: set[int] = set()
    m: Any = model
    while id(m) not in seen:
        seen.add(id(m))
        if is_target(m):
            return m
        for attr in WRAPPER_ATTRS:
            inner = getattr(m, attr, None)
            if isinstance(inner, nn.Module):
                m = inner
                break
        else:
            break
    return next((sub for sub in model.modules() if is_target(sub)), None)


@dataclass
class LoadedModel:
    """A model with the user's weights, as a stack built and loaded it."""

    stack: "Stack"
    model: nn.Module  # eval mode, on the device
    cfg: Any  # the stack's own config object
    tokenizer: Any  # a fast tokenizer (char_to_token): positive maps come from its untruncated tokenization
    max_text_len: int  # logits have this many text columns; longer captions are truncated (or rejected)
    # What the checkpoint held, under the model's own key names; where the model holds the same values the
    # tensor is the model's own (`formats.shared_state`: one copy of the weights)
    state_dict: dict[str, Tensor]
    key_fit: KeyFit
    inputs: dict[str, Any] = field(default_factory=dict)  # report metadata: checkpoint, sha256, config, ...


class Stack(abc.ABC):
    """One model family. Instances are stateless; the registry holds one of each."""

    name: ClassVar[str]  # stable, used in dumps and --stack: "groundingdino-py", "transformers"
    default_preset: ClassVar[str] = "mmdet"  # verify-fix's --preset when none is given
    truncates_captions: ClassVar[bool] = True  # False: a caption over max_text_len makes the forward raise

    # ---------------------------------------------------------------- models
    @abc.abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """True when `model`, or a module inside it (DDP, PEFT, torch.compile), is of this family."""

    def preset_for(self, model: nn.Module) -> str:
        """verify-fix's --preset for this model when none is given (a family may hold models of two trainers)."""
        return self.default_preset

    @abc.abstractmethod
    def find_model(self, model: nn.Module) -> nn.Module:
        """The detector module inside wrappers; raises `ConfigError` when there is none."""

    # ---------------------------------------------------------------- files
    @abc.abstractmethod
    def claims(self, checkpoint: Path) -> bool:
        """True when this stack reads `checkpoint` (a file or a folder) without being asked by name."""

    @abc.abstractmethod
    def load(self, checkpoint: PathLike, *, config: PathLike | None = None, text_encoder: str | None = None,
             trust: bool = False, device: torch.device = torch.device("cpu"),
             hash_checkpoint: bool = True, adapter: PathLike | None = None, merge_lora: bool = False) -> LoadedModel:
        """Build the model, load the checkpoint (never strict, always reported) and move it to `device`.

        adapter: a PEFT (LoRA) adapter folder or file on top of the checkpoint; merge_lora merges it into the
        weights instead of replaying it through PEFT's layers. A stack that cannot apply one raises ConfigError."""

    @abc.abstractmethod
    def load_tokenizer(self, *, config: PathLike | None = None, text_encoder: str | None = None) -> tuple[Any, int]:
        """`(tokenizer, max_text_len)` without building the model (what `nanscope scan` needs)."""

    # ---------------------------------------------------------------- a forward
    @abc.abstractmethod
    def model_call(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """`(args, kwargs)` for `model(*args, **kwargs)` on a validated `Batch`."""

    @abc.abstractmethod
    def capture(self, model: nn.Module, *, detach: bool = True) -> ContextManager[Capture]:
        """Hooks that fill one `ForwardRecord` per forward of `model`; removed on exit, also on exceptions."""

    def check_batch(self, model: nn.Module, batch: Any) -> None:
        """Raise `BatchError` for a validated batch this model cannot run (e.g. images below its minimum size),
        before the forward fails inside the model's code."""
        return None

    def targets(self, batch: Any, texts: list[Any], device: torch.device) -> list[dict[str, Any]]:
        """Criterion targets: boxes [N, 4] cxcywh, binary positive_map [N, T] and the names public trainers
        read (token_labels, labels, class_labels, caption, phrases, tokens_positive; see
        `nanscope.replay.criterion_inputs`)."""
        from nanscope.replay.criterion_inputs import criterion_targets

        return criterion_targets(batch, texts, device)

    def call_captions(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str] | None:
        """The captions in a call of the detector (`find_model(model)`), as its forward reads them; None if none."""
        return None

    def reference_criterion(self, preset: str) -> str | None:
        """`MODULE:ATTR` of this stack's own loss for `preset`, when it ships one (None: nanscope's)."""
        return None

    def criterion(self, name: str, model: nn.Module) -> tuple[Any, str] | None:
        """`(criterion, display name)` for a short name this stack ships (e.g. 'transformers'), built for
        `model`; None when `name` is not one (then it is read as MODULE:ATTR)."""
        return None

    def finding_note(self, code: str, data: dict[str, Any]) -> str | None:
        """A sentence an analyzer appends to finding `code` about what this stack's own code does with the
        problem (e.g. whether its matcher raises on non-finite costs); `data` holds the finding's numbers."""
        return None

    # ---------------------------------------------------------------- watch dumps
    def dump_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The live weights as plain CPU tensors, under names `load` accepts again."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.find_model(model).state_dict().items()
                if isinstance(v, Tensor)}

    @abc.abstractmethod
    def dump_meta(self, model: nn.Module) -> dict[str, Any]:
        """JSON values (never code or paths to code) a replay of a dump needs besides the weights."""
