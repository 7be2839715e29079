"""Safe checkpoint loading and a key-fit report (groundingdino's own loader hides missing keys).

`read_state_dict` accepts groundingdino's `{"model": state_dict}`, `{"state_dict": ...}` or a bare
state dict, strips a `module.` prefix (DDP), and loads with `weights_only=True` unless the user passes
`trust=True` (the CLI's `--trust-checkpoint`); `argparse.Namespace` (Open-GroundingDino's saved `args`) is
allowed under weights_only, nothing else that pickles code. A safetensors file is read as tensors whatever its
suffix, and a file that is neither says so instead of asking for `--trust-checkpoint`. The file is only read,
never written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanscope.errors import CheckpointError

MIN_FIT = 0.5  # below this fraction of the model's keys matched, the file is another model's state dict
# Unexpected keys that real GroundingDINO checkpoints carry and that are harmless when left out:
# the denoising label embedding (training only; groundingdino-py builds the model with dn_number=0).
TRAINING_ONLY_PREFIXES = ("label_enc.",)
# Other unexpected keys that are harmless, with why.
HARMLESS_PREFIXES = {
    "data_preprocessor.": "MMDetection's image normalization buffers (the batch holds the images as the model saw them)",
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:240]


# Classes a checkpoint may hold under weights_only besides tensors and containers: plain records that
# run no code when unpickled (their state is set with __dict__.update). Open-GroundingDino saves its
# command-line arguments as `args`, an argparse.Namespace.
SAFE_GLOBALS = (argparse.Namespace,)
SAFETENSORS_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def file_kind(path: Path) -> str:
    """'zip' (torch.save), 'pickle' (legacy torch.save), 'safetensors' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= min(SAFETENSORS_MAX_HEADER, path.stat().st_size - 8):
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol 2+: the legacy (non-zip) torch.save format
        return "pickle"
    return "unknown"


def _refused_global(exc: BaseException) -> str | None:
    """The class a weights_only load refused ('pathlib.PosixPath'), read from torch's message."""
    m = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return m.group(1) if m else None


def _unsafe_globals(p: Path) -> list[str]:
    """Every class or function a weights_only load would refuse in `p`, read without unpickling anything."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(p)
    except Exception:  # an older torch, or a file it cannot scan: the first refused name is still known
        return []
    from nanscope.stacks.formats.mmengine_records import safe_global_names

    allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS} | safe_global_names()
    return [n for n in names if n not in allowed]


def _torch_load(p: Path, *, trust: bool) -> Any:
    from nanscope.stacks.formats.mmengine_records import mmengine_safe_globals

    try:
        if trust:
            return torch.load(p, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([*SAFE_GLOBALS, *mmengine_safe_globals()]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        name = _refused_global(exc)
        if not trust and name is not None:
            names = _unsafe_globals(p) or [name]
            raise CheckpointError(
                f"checkpoint {str(p)!r} holds pickled objects besides the weights ({', '.join(names[:4])}"
                f"{', ...' if len(names) > 4 else ''}), and unpickling them can run code; nanscope loads tensors, "
                "containers, argparse.Namespace and MMEngine's HistoryBuffer/ConfigDict/numpy records only. If you "
                "trust this file, pass --trust-checkpoint, or re-save its weights as {'model': model.state_dict()}."
            ) from None
        if (m := re.search(r"getattr\(.*?\) in the pickle[^\n]*", str(exc))) is not None:  # mmengine_records
            raise CheckpointError(f"checkpoint {str(p)!r} holds {m.group(0)}; pass --trust-checkpoint if you "
                                  "trust this file") from None
        raise CheckpointError(f"checkpoint {str(p)!r} is not a readable torch file ({_first_line(exc)})") from None
    except Exception as exc:  # truncated zip, ...
        raise CheckpointError(
            f"checkpoint {str(p)!r} is not a readable torch file ({_first_line(exc)}); "
            "expected a file written by torch.save"
        ) from None


def _safetensors_load(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorsError (no stable import path) and OSError
        raise CheckpointError(f"checkpoint {str(p)!r} is a damaged safetensors file ({_first_line(exc)})") from None


def read_checkpoint(path: str | os.PathLike[str], *, trust: bool = False) -> Any:
    """The object in a checkpoint file: torch.save (zip or legacy) under weights_only, or a safetensors
    file (whatever its suffix: it holds tensors only, so it is always safe)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    kind = file_kind(p)
    from nanscope.load_bounds import check_loaded

    if kind == "safetensors":
        obj = _safetensors_load(p)
        check_loaded(obj, f"checkpoint {str(p)!r}", error=CheckpointError)
        return obj
    if kind == "unknown":
        with open(p, "rb") as f:
            head = f.read(8)
        raise CheckpointError(
            f"checkpoint {str(p)!r} is not a readable torch file: it starts with bytes {head.hex(' ')}, which is "
            "neither a torch.save zip (50 4b 03 04), a legacy torch.save pickle (80 ..) nor a safetensors header; "
            "expected a file written by torch.save or safetensors"
        )
    obj = _torch_load(p, trust=trust)
    check_loaded(obj, f"checkpoint {str(p)!r}", error=CheckpointError)  # expanded tensors, nesting: before any pass
    return obj


def read_state_dict(path: str | os.PathLike[str], *, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {name: tensor} dict."""
    p = Path(path)
    obj = read_checkpoint(p, trust=trust)
    sd: Any = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                sd = obj[key]
                break
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(
            f"checkpoint {str(p)!r} holds a {type(obj).__name__} with no state dict; "
            "expected {'model': state_dict} or a bare state dict"
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = str(k)
        name = name.removeprefix("module.")
        out[name] = v
    if not out:
        raise CheckpointError(f"checkpoint {str(p)!r} holds no tensors; expected a model state dict")
    return out


@dataclass(frozen=True)
class KeyFit:
    """How a state dict fits a model."""

    matched: tuple[str, ...]
    missing: tuple[str, ...]  # in the model, not in the file: left at random init by strict=False
    unexpected: tuple[str, ...]  # in the file, not in the model
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # name, file shape, model shape
    # Unexpected keys known to be harmless, with why: buffers the model keeps out of its state dict
    # (e.g. BERT's position_ids in transformers >= 4.31, saved by older versions) and training-only weights.
    benign: tuple[tuple[str, str], ...] = ()
    # Floating tensors of another dtype than the model's, which loading converts: (file dtype, model dtype, count).
    converted: tuple[tuple[str, str, int], ...] = ()
    # Keys that are one parameter in the model (tied) but hold different values in the file: loading keeps
    # only one of them. (keys, largest absolute difference).
    tied_differ: tuple[tuple[tuple[str, ...], float], ...] = ()
    notes: tuple[str, ...] = ()  # how the loader adapted the model or the keys to the file (said in NS306)
    adapter: Any = None  # nanscope.stacks.formats.peft.AdapterInfo when LoRA weights were loaded
    # The training wrapper's prefix the file's model keys sit under (a LightningModule attribute such as
    # "model."; torch.compile's "_orig_mod."): key names above are the model's, the file's are prefix + name.
    prefix: str = ""

    @property
    def fraction(self) -> float:
        total = len(self.matched) + len(self.missing) + len(self.mismatched)
        return len(self.matched) / max(total, 1)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.tied_differ)


def tied_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """State-dict keys that name one tensor (tied parameters, e.g. groundingdino's shared box heads)."""
    by_id: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if isinstance(v, torch.Tensor):
            by_id.setdefault(id(v), []).append(k)
    return [tuple(ks) for ks in by_id.values() if len(ks) > 1]


def differing_ties(model: nn.Module, state: Mapping[str, torch.Tensor],
                   groups: list[tuple[str, ...]] | None = None) -> list[tuple[tuple[str, ...], float]]:
    """Tied groups (`tied_groups(model)` unless given) whose values in `state` are not all equal, with the
    largest absolute difference."""
    out = []
    for keys in (tied_groups(model) if groups is None else groups):
        present = [k for k in keys if k in state]
        if len(present) < 2 or len({tuple(state[k].shape) for k in present}) != 1:
            continue
        first = state[present[0]]
        diff = max(float((state[k].float() - first.float()).abs().max()) for k in present[1:])
        if diff > 0 or any(not torch.equal(state[k], first) for k in present[1:]):
            out.append((tuple(present), diff))
    return out


def _converted(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
               matched: list[str]) -> tuple[tuple[str, str, int], ...]:
    counts: dict[tuple[str, str], int] = {}
    for k in matched:
        a, b = state[k], own[k]
        if a.is_floating_point() and a.dtype != b.dtype:
            key = (str(a.dtype).removeprefix("torch."), str(b.dtype).removeprefix("torch."))
            counts[key] = counts.get(key, 0) + 1
    return tuple((a, b, n) for (a, b), n in sorted(counts.items()))


def key_fit(model: nn.Module, state: Mapping[str, torch.Tensor]) -> KeyFit:
    own = model.state_dict()
    matched, mismatched = [], []
    for k, v in state.items():
        if k in own:
            if tuple(own[k].shape) == tuple(v.shape):
                matched.append(k)
            else:
                mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
    missing, unexpected, benign = [], [], []
    groups = tied_groups(model)
    tied_to = {k: next((o for o in group if o in state), None) for group in groups for k in group}
    for k in sorted(k for k in own if k not in state):
        if tied_to.get(k) is not None:  # safetensors writers (Accelerate, save_pretrained) drop shared tensors
            benign.append((k, f"tied to {tied_to[k]!r}, which the file holds (one tensor in the model)"))
        else:
            missing.append(k)
    non_persistent = {k for k, _ in model.named_buffers()} - set(own)
    for k in sorted(k for k in state if k not in own):
        if k in non_persistent:
            benign.append((k, "a non-persistent buffer of this model (rebuilt at init)"))
        elif k.startswith(TRAINING_ONLY_PREFIXES):
            benign.append((k, "training-only (denoising label embedding)"))
        elif (why := next((w for pre, w in HARMLESS_PREFIXES.items() if k.startswith(pre)), None)) is not None:
            benign.append((k, why))
        else:
            unexpected.append(k)
    return KeyFit(tuple(sorted(matched)), tuple(missing), tuple(unexpected), tuple(sorted(mismatched)),
                  tuple(benign), _converted(own, state, matched), tuple(differing_ties(model, state, groups)))


GDPY_EXPECTED = "groundingdino weights such as 'transformer.encoder.layers.0...' - check --config and the file"


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
              expected: str = GDPY_EXPECTED) -> KeyFit:
    """Copy every fitting tensor into `model`; refuse a file that is clearly another model's.

    expected: what the message says a fitting file holds (the stack's key names). A file whose keys sit under
    a training wrapper's prefix (Lightning's `model.`, torch.compile's `_orig_mod.`) loads from under it."""
    fit, loaded, prefix = key_fit(model, state), state, ""
    if fit.fraction < MIN_FIT and (found := wrapper_prefix(model, state)):
        inner = {k[len(found):]: v for k, v in state.items() if k.startswith(found)}
        inner_fit = key_fit(model, inner)
        if inner_fit.fraction >= MIN_FIT:
            fit, loaded, prefix = inner_fit, inner, found
    if fit.fraction < MIN_FIT:
        some = ", ".join(list(state)[:3])
        raise CheckpointError(
            f"{source} does not look like a checkpoint of this GroundingDINO config: only {len(fit.matched)} of "
            f"{len(fit.matched) + len(fit.missing) + len(fit.mismatched)} model weights are in it "
            f"(its keys start with {some}); expected {expected}{_other_family(state)}"
        )
    model.load_state_dict({k: loaded[k] for k in fit.matched}, strict=False)
    if not prefix:
        return fit
    outside = sorted(k for k in state if not k.startswith(prefix))
    note = (f"the model's weights sit under {prefix!r} in the file (a training wrapper's attribute: a "
            f"LightningModule's, an MMEngine BaseModel's): loaded from there" + (f"; {len(outside)} key(s) outside it (the wrapper's "
            f"own state, e.g. {outside[0]!r}) were not loaded" if outside else ""))
    why = f"outside the model's prefix {prefix!r}: the training wrapper's own state"
    return dataclasses.replace(fit, benign=fit.benign + tuple((k, why) for k in outside),
                               notes=fit.notes + (note,), prefix=prefix)


def wrapper_prefix(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """The leading key prefix (one to three dotted parts) under which most of `model`'s keys are in `state`, or ""."""
    own = set(model.state_dict())
    counts: dict[str, int] = {}
    for k in state:
        parts = k.split(".")
        for depth in range(1, min(len(parts), 4)):
            prefix = ".".join(parts[:depth]) + "."
            if k[len(prefix):] in own:
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return ""
    best = max(counts, key=lambda p: (counts[p], -len(p)))
    return best if counts[best] >= MIN_FIT * len(own) else ""


def _other_family(state: Mapping[str, torch.Tensor]) -> str:
    """A clause naming the model family whose key names `state` has, when nanscope knows it."""
    if any(k.startswith(("model.text_backbone.", "model.backbone.conv_encoder.")) for k in state):
        return ("; its keys are transformers' GroundingDinoForObjectDetection names: pass --stack hf with --config "
                "the model's config.json")
    return ""


def file_sha256(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
