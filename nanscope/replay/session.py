"""Replay one batch through the user's model: build, load the checkpoint, run the forward with capture.

Shared by `inspect`, `verify-fix` and the replay of `watch` dumps. The model family is a stack
(`nanscope.stacks`): detected from the checkpoint, or named. Inputs are only read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nanscope import progress
from nanscope.errors import DeviceError, InputError
from nanscope.replay.batch import Batch
from nanscope.replay.batch_file import read_batch
from nanscope.replay.positive_map import TextInfo, build_text_info
from nanscope.stacks import stack_for_checkpoint
from nanscope.stacks.base import Stack
from nanscope.stacks.capture import ForwardRecord
from nanscope.stacks.formats.checkpoint import KeyFit


def resolve_device(device: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or None (cuda when available, else cpu)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device!r} is not a device name; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} was asked for but this torch sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device} is not supported; expected cpu or cuda")
    return dev


@dataclass
class Replay:
    """A model with the user's weights, the batch, and what nanscope derived from them."""

    model: nn.Module
    cfg: Any
    batch: Batch
    texts: list[TextInfo]
    state_dict: dict[str, torch.Tensor]
    key_fit: KeyFit
    device: torch.device
    inputs: dict[str, Any]  # paths, hashes, options, for reports
    stack: Stack | None = None  # None: the model's own stack, found when first needed
    max_text_len: int = 256
    tokenizer: Any = None  # the stack's fast tokenizer (None: the model's own `tokenizer` attribute)
    train_mode: bool = False  # forwards in training mode (dropout, drop-path on), as the training step ran them
    rng: Mapping[str, Any] | None = None  # generator states set at each training-mode forward (`load_rng`)
    trust_checkpoint: bool = False  # the checkpoint may be unpickled in full (`--trust-checkpoint`)

    def __post_init__(self) -> None:
        if self.stack is None:
            from nanscope.stacks import stack_for_model

            self.stack = stack_for_model(self.model)

    def targets(self) -> list[dict[str, torch.Tensor]]:
        """Criterion targets (DETR convention): boxes [N, 4] cxcywh and binary positive_map [N, T]."""
        assert self.stack is not None
        return self.stack.targets(self.batch, self.texts, self.device)

    def criterion_extras(self) -> dict[str, Any]:
        """Values for a criterion's or matcher's extra parameters, by name (cat_list, caption, label_map, ...)."""
        from nanscope.replay.criterion_inputs import criterion_extras

        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(self.model, "tokenizer", None)
        return criterion_extras(self.texts, tokenizer, self.device)

    def model_call(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """`(args, kwargs)` of the model call for this batch, on the replay's device."""
        assert self.stack is not None
        return self.stack.model_call(self.model, self.batch, self.device)

    def samples(self) -> Any:
        """The first positional model input (groundingdino-py: the image tensor or its NestedTensor)."""
        return self.model_call()[0][0]

    def run(self, model: nn.Module | None = None) -> Any:
        """One forward of `model` (default: the replay's) on the batch; returns what the model returns."""
        args, kwargs = self.model_call()
        return (model if model is not None else self.model)(*args, **kwargs)

    def criterion(self, spec: Any) -> tuple[Any, str]:
        """`(criterion, name)` for a spec: a short name the stack ships ('transformers'), `MODULE:ATTR`,
        or an already loaded `(criterion, name)` pair."""
        from nanscope.user_code import load_criterion

        if not isinstance(spec, str):
            return spec
        assert self.stack is not None
        named = self.stack.criterion(spec, self.model)
        if named is not None:
            return named
        if ":" not in spec.replace(":\\", ""):
            from nanscope.errors import CriterionError

            raise CriterionError(f"criterion {spec!r} is not MODULE:ATTR, and the {self.stack.name} stack ships no "
                                 "criterion of that name (the transformers stack ships 'transformers')")
        return load_criterion(spec, saved_args=self.saved_args)

    def saved_args(self) -> Any:
        """The checkpoint's saved training `args` (an argparse.Namespace, as Open-GroundingDino saves), or None."""
        from nanscope.stacks.formats.saved_args import saved_args

        return saved_args(self.inputs.get("checkpoint"), trust=self.trust_checkpoint)

    def mode(self) -> contextlib.AbstractContextManager[None]:
        """The mode forwards replay in: eval, or with `train_mode` training mode from the recorded RNG state."""
        return training_forward(self.model, self.rng) if self.train_mode else contextlib.nullcontext()

    def forward(self, *, detach: bool = True, grad: bool = False) -> ForwardRecord:
        """One captured forward (eval mode unless `train_mode`; no gradients unless `grad`)."""
        assert self.stack is not None
        with torch.set_grad_enabled(grad), self.mode(), self.stack.capture(self.model, detach=detach) as cap:
            self.run()
        return cap.last


@contextlib.contextmanager
def training_forward(model: nn.Module, rng: Mapping[str, Any] | None = None) -> Iterator[None]:
    """`model.train()` for the block, with the generators set from `rng` (a `portable_rng` dict, e.g. a
    dump's `rng.pt["before_forward"]`) at its start, so dropout and drop-path draw the masks the
    training step drew. On exit, also on exceptions, every module's mode, every buffer (batch-norm
    running statistics) and the generators are as they were: no state change of the replay is kept.
    No optimizer step is taken."""
    from nanscope.watch.snapshot import capture_rng, portable_rng, restore_rng

    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    saved = portable_rng(capture_rng())
    try:
        model.train()
        if rng is not None:
            restore_rng(rng)
        yield
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for m, was in modes:
            m.training = was
        restore_rng(saved)


def load_rng(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The generator states of a watch dump's `rng.pt` at the step's first forward ("before_forward")."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"RNG file {str(path)!r} cannot be read ({why}); expected a nanscope.watch dump's "
                         "rng.pt") from None
    before = state.get("before_forward") if isinstance(state, dict) else None
    if not isinstance(before, dict) or not isinstance(before.get("torch"), torch.Tensor):
        raise InputError(f"RNG file {str(path)!r} holds no 'before_forward' generator state; expected a "
                         "nanscope.watch dump's rng.pt (a dump of a step whose forward was seen)")
    return before


def prepare(
    checkpoint: str | os.PathLike[str],
    batch: str | os.PathLike[str] | Batch,
    *,
    config: str | os.PathLike[str] | None = None,
    text_encoder: str | None = None,
    device: str | None = "cpu",
    trust_checkpoint: bool = False,
    hash_checkpoint: bool = True,
    stack: str | None = None,
    adapter: str | os.PathLike[str] | None = None,
    merge_lora: bool = False,
) -> Replay:
    """Load everything a replay needs; raises `InputError` subclasses with one-line reasons.

    stack: the model family by name ('groundingdino-py', ...); None detects it from `checkpoint`.
    adapter: a PEFT adapter folder or file applied on top of `checkpoint`; merge_lora merges it.
    """
    from nanscope.preflight import config_stack

    stack = config_stack(config, stack)  # a wrong --config fails before the batch is read
    dev = resolve_device(device)
    with progress.stage("reading the batch", "read the batch"):
        b = read_batch(batch) if isinstance(batch, (str, os.PathLike)) else batch  # a Batch, or the HF form
    st = stack_for_checkpoint(checkpoint, stack=stack)
    loaded = st.load(checkpoint, config=config, text_encoder=text_encoder, trust=trust_checkpoint, device=dev,
                     hash_checkpoint=hash_checkpoint, **_adapter_options(adapter, merge_lora))
    if not isinstance(b, Batch):  # the Hugging Face form needs the tokenizer to become a Batch
        from nanscope.replay.hf_batch import to_batch

        b = to_batch(b, loaded.tokenizer)
    st.check_batch(loaded.model, b)  # sizes the model cannot run fail here, not inside its forward
    texts = build_text_info(loaded.tokenizer, b, max_text_len=loaded.max_text_len)
    inputs = {"checkpoint": str(checkpoint), "checkpoint_sha256": None,
              "batch": str(batch) if isinstance(batch, (str, os.PathLike)) else b.source, **loaded.inputs,
              "device": str(dev)}
    return Replay(loaded.model, loaded.cfg, b, texts, loaded.state_dict, loaded.key_fit, dev, inputs,
                  stack=st, max_text_len=loaded.max_text_len, tokenizer=loaded.tokenizer,
                  trust_checkpoint=trust_checkpoint)


def _adapter_options(adapter: str | os.PathLike[str] | None, merge_lora: bool) -> dict[str, Any]:
    """Only the options that were set, so a stack without adapter support is called as before."""
    return {k: v for k, v in (("adapter", adapter), ("merge_lora", merge_lora)) if v}
