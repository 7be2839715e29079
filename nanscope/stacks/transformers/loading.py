"""Reading a Hugging Face GroundingDino: its config.json, its weights, its tokenizer, with a key-fit report.

Two inputs are read:
  - a `save_pretrained` folder (config.json + model.safetensors, optionally the tokenizer files): loaded
    with `from_pretrained(..., local_files_only=True)`, so weight tying and the key renames of the
    installed transformers apply exactly as in the user's own code;
  - a state-dict file (a nanscope.watch dump's checkpoint.pth, or `torch.save(model.state_dict())`)
    with the config given separately (a config.json, a folder holding one, or the dump manifest's
    `stack.hf_config`): read with nanscope's `weights_only` reader and loaded into the built model.
Nothing here runs code from the input (no `trust_remote_code`). transformers' progress bars and load
warnings are switched off while loading and restored after (5.x writes them to stderr).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from nanscope.errors import CheckpointError, ConfigError
from nanscope.stacks.formats.checkpoint import KeyFit, load_into, read_state_dict

# config.json model_type -> the transformers class nanscope replays
MODEL_CLASSES = {
    "grounding-dino": ("GroundingDinoConfig", "GroundingDinoForObjectDetection"),
    "mm-grounding-dino": ("MMGroundingDinoConfig", "MMGroundingDinoForObjectDetection"),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# Keys one transformers version saves and another does not build, harmless to the model (measured):
# 5.x saves Swin's final layernorm, which GroundingDino's backbone never calls and 4.57 does not create.
HARMLESS_UNEXPECTED = {r"\.swin\.layernorm\.(weight|bias)$": "Swin's final layernorm, which GroundingDino's "
                       "backbone never uses (transformers 5.x saves it, 4.x does not build it)"}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load warnings from transformers inside; the previous settings come back on exit."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _config_file(config: str | os.PathLike[str]) -> Path:
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"config {str(config)!r} does not exist; expected a transformers config.json "
                          "(or the save_pretrained folder holding it)")
    return p


def config_dict(config: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON of a config.json (or of the folder holding one), checked to be a GroundingDino config."""
    p = _config_file(config)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config {str(p)!r} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(p)!r} holds a {type(data).__name__}; expected a JSON object")
    check_model_type(data, str(p))
    return data


def check_model_type(data: Mapping[str, Any], source: str) -> None:
    kind = data.get("model_type")
    if kind not in MODEL_CLASSES:
        arch = data.get("architectures")
        raise ConfigError(f"{source} has model_type {kind!r} (architectures {arch!r}); expected one of "
                          f"{', '.join(repr(k) for k in MODEL_CLASSES)} (GroundingDinoForObjectDetection, "
                          "MMGroundingDinoForObjectDetection)")


def build_config(data: Mapping[str, Any]) -> Any:
    """A transformers config object from its JSON dict (the class named by model_type)."""
    import transformers

    check_model_type(data, "config")
    cls_name = MODEL_CLASSES[str(data["model_type"])][0]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ConfigError(f"transformers {transformers.__version__} has no {cls_name}; "
                          "install a transformers version that ships it")
    with quiet_transformers():
        return cls.from_dict(dict(data))


def model_class(config: Any) -> type[nn.Module]:
    import transformers

    name = MODEL_CLASSES[config.model_type][1]
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ConfigError(f"transformers {transformers.__version__} has no {name}")
    return cls


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"folder {str(folder)!r} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                          "expected the folder model.save_pretrained(...) writes")


def _benign(model: nn.Module, key: str, kind: str) -> str | None:
    """Why a missing/unexpected key is harmless, or None when it is not."""
    patterns = getattr(model, f"_keys_to_ignore_on_load_{kind}", None) or []
    if any(re.search(p, key) for p in patterns):
        return f"transformers ignores it ({type(model).__name__}._keys_to_ignore_on_load_{kind})"
    if kind == "unexpected":
        return next((why for p, why in HARMLESS_UNEXPECTED.items() if re.search(p, key)), None)
    if kind == "missing":
        buffers = dict(model.named_buffers())
        if key in buffers and not buffers[key].is_floating_point():
            return "an integer index buffer the model computes at init"
    return None


def fit_from_loading_info(model: nn.Module, info: Mapping[str, Any]) -> KeyFit:
    """transformers' `output_loading_info` as nanscope's KeyFit (harmless keys go to `benign`)."""
    mismatched = tuple(sorted((item[0], tuple(item[1]), tuple(item[2])) for item in info.get("mismatched_keys") or ()))
    missing = tuple(sorted(info.get("missing_keys") or ()))
    bad = set(missing) | {m[0] for m in mismatched}
    matched = tuple(sorted(k for k in model.state_dict() if k not in bad))
    return harmless_keys(model, KeyFit(matched, missing, tuple(sorted(info.get("unexpected_keys") or ())), mismatched))


def load_folder(folder: Path, *, config: str | os.PathLike[str] | None = None) -> tuple[nn.Module, Any, KeyFit, Path]:
    """A save_pretrained folder -> (model in eval mode, config, key fit, weights file)."""
    data = config_dict(config if config is not None else folder)
    weights = _weights_file(folder)
    cfg = build_config(data)
    cls = model_class(cfg)
    try:
        with quiet_transformers():
            # mis-shaped weights are reported (NS306) rather than raised, like every other key-fit problem
            model, info = cls.from_pretrained(str(folder), config=cfg, output_loading_info=True,
                                              local_files_only=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointError(f"{str(weights)!r} could not be loaded into {cls.__name__} ({first})") from None
    return model.eval(), cfg, fit_from_loading_info(model, info), weights


def load_state_file(path: Path, config_data: Mapping[str, Any], *, trust: bool = False,
                    seed: int = 0) -> tuple[nn.Module, Any, KeyFit, dict[str, torch.Tensor]]:
    """A state-dict file plus a config dict -> (model, config, key fit, the file's tensors the model took: by
    the model's names, or every tensor by the file's own names when transformers' loading renamed them)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file ({exc})") from None
    else:
        state = read_state_dict(path, trust=trust)
    return _model_for_state(path, state, config_data, seed)


def _model_for_state(path: Path, state: dict[str, torch.Tensor], config_data: Mapping[str, Any],
                     seed: int) -> tuple[nn.Module, Any, KeyFit, dict[str, torch.Tensor]]:
    cfg = build_config(config_data)
    torch.manual_seed(seed)  # weights the file lacks are reported (NS306); make their init reproducible
    with quiet_transformers():
        model = model_class(cfg)(cfg)
    fit = harmless_keys(model, load_into(model, state, source=f"checkpoint {str(path)!r}",
                                         expected=f"{type(model).__name__} keys such as 'model.encoder.layers.0...' - "
                                                  "check the file and the config"))
    if fit.missing or fit.unexpected:  # save_pretrained's names (5.x renames and ties keys when it saves)
        other, refit = _refit_as_transformers(model, cfg, state, fit, seed)
        if refit is not fit:
            return other.eval(), cfg, refit, state
    return model.eval(), cfg, fit, {k: state[fit.prefix + k] for k in fit.matched}


def _refit_as_transformers(model: nn.Module, cfg: Any, state: dict[str, torch.Tensor], fit: KeyFit,
                           seed: int) -> tuple[nn.Module, KeyFit]:
    """The file loaded the way `from_pretrained` loads it (its key renames and tied weights), when that fits
    better than the names as they are; else the first fit, unchanged."""
    torch.manual_seed(seed)
    try:
        with quiet_transformers():
            other, info = model_class(cfg).from_pretrained(None, config=cfg, state_dict=state, output_loading_info=True,
                                                           ignore_mismatched_sizes=True)
    except Exception:  # noqa: BLE001 - any failure of this second try keeps the plain fit, which is reported
        return model, fit
    refit = fit_from_loading_info(other, info)
    if len(refit.missing) + len(refit.unexpected) + len(refit.mismatched) >= \
            len(fit.missing) + len(fit.unexpected) + len(fit.mismatched):
        return model, fit
    return other, dataclasses.replace(refit, notes=(*refit.notes, "keys renamed and tied by transformers' own "
                                                     "loading, as from_pretrained reads a save_pretrained file"))


def harmless_keys(model: nn.Module, fit: KeyFit) -> KeyFit:
    """`fit` with the missing and unexpected keys transformers itself ignores moved to `benign`
    (e.g. Swin's relative_position_index buffers, which 4.57 saves and 5.x recomputes)."""
    benign = list(fit.benign)
    missing, unexpected = [], []
    for keys, kind, kept in ((fit.missing, "missing", missing), (fit.unexpected, "unexpected", unexpected)):
        for key in keys:
            why = _benign(model, key, kind)
            (benign.append((key, why)) if why else kept.append(key))
    return dataclasses.replace(fit, missing=tuple(missing), unexpected=tuple(unexpected), benign=tuple(benign))


def has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(source: str | os.PathLike[str]) -> Any:
    """A fast tokenizer (char_to_token works) from a folder or a Hugging Face name (offline cache only)."""
    from transformers import AutoTokenizer

    src = str(source)
    if Path(src).is_dir():
        src = str(Path(src).resolve())
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise ConfigError(f"text encoder {src!r} has no tokenizer nanscope can load ({first}); pass --text-encoder "
                          "with the folder the processor was saved to (tokenizer.json or vocab.txt)") from None
    try:
        tok("a").char_to_token(0)
    except Exception:
        raise ConfigError(f"the tokenizer of {src!r} is not a fast tokenizer (no char_to_token); nanscope needs the "
                          "tokenizers-backed one to map phrases to tokens") from None
    return tok
