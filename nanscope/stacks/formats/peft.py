"""PEFT (LoRA) checkpoints: a wrapped model's full state dict, adapter folders, trainable-only files, dumps.

Key layouts (PEFT 0.21, adapter name "default"):

    full state dict of get_peft_model(m)   base_model.model.X.base_layer.weight, X.lora_A.default.weight [r, in],
                                           X.lora_B.default.weight [out, r]; modules_to_save as
                                           X.original_module.* + X.modules_to_save.default.*
    save_pretrained folder                 adapter_config.json + adapter_model.safetensors with keys
                                           base_model.model.X.lora_A.weight (no adapter name) and modules_to_save
                                           as base_model.model.X.weight
    trainable-only file                    the requires_grad part of the full state dict (LoRA, modules_to_save,
                                           heads the trainer unfroze): it needs the base checkpoint
    nanscope.watch dump                    the detector's own state dict inside the PeftModel (no prefix), with
                                           the live adapter's adapter_config.json next to checkpoint.pth

The replay runs the adapter unmerged through PEFT's own layers (what training ran); `merge=True` merges
it (`W += B @ A * lora_alpha / r`) and replays a plain model. `peft` is imported only here, when a
checkpoint holds LoRA weights (`pip install nanscope[peft]`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanscope.errors import CheckpointError, ConfigError

PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the user's model
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DEFAULT_ADAPTER = "default"
DEFAULT_LORA_ALPHA = 8  # peft.LoraConfig's default, assumed when no adapter_config.json says otherwise (NS309)
_LORA = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(?:\.(?P<name>(?!weight$)[^.]+))?"
                   r"\.(?P<param>weight|bias)$")


@dataclass(frozen=True)
class AdapterInfo:
    """What the loader knows about the LoRA adapter it applied (read by NS306 / NS308 / NS309)."""

    source: str  # "full PEFT state dict", "adapter folder 'x'", "trainable-only file", ...
    targets: tuple[str, ...]  # module paths that carry LoRA
    r: int  # the most common rank
    lora_alpha: float
    alpha_assumed: bool  # no adapter_config.json: peft's default lora_alpha was assumed
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    use_dora: bool = False
    merged: bool = False
    config_file: str | None = None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)


def _import_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError("this checkpoint holds LoRA (PEFT) weights and peft is not installed; "
                          "`pip install nanscope[peft]` (or `pip install peft`)") from None
    return peft


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PREFIX): v for k, v in state.items()}


def is_peft_state(state: Mapping[str, Any]) -> bool:
    """True when the keys are a PEFT model's (LoRA layers, wrapped base layers, modules_to_save)."""
    return any(k.startswith(PREFIX) or _LORA.match(k) or ".base_layer." in k or ".modules_to_save." in k
               or ".original_module." in k for k in state)


def _in_modules_to_save(key: str, modules: tuple[str, ...]) -> str | None:
    parts = key.split(".")
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        if any(path == m or path.endswith("." + m) for m in modules):
            return path
    return None


@dataclass
class SplitState:
    """A PEFT state dict split into the base model's weights (plain names) and the adapter's (injected names)."""

    base: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor]
    adapter_name: str
    # Base keys a trainable-only file or adapter brought (heads the trainer unfroze): newer than the base
    # checkpoint's values, also for the other names of a tied parameter (`spread_over_ties`).
    overrides: tuple[str, ...] = ()


def spread_over_ties(model: nn.Module, split: SplitState) -> None:
    """Give every name of a tied parameter the value an override brought: PyTorch saves a tied parameter
    under one name only in a trainable-only file (`named_parameters` lists it once), while the base
    checkpoint holds all its names with the old values."""
    from nanscope.stacks.formats.checkpoint import tied_groups

    new = set(split.overrides)
    for keys in tied_groups(model):
        given = [k for k in keys if k in new]
        if given:
            for k in keys:
                split.base[k] = split.base[given[0]]


def split_state(state: Mapping[str, torch.Tensor], *, modules_to_save: tuple[str, ...] = (),
                adapter_name: str | None = None) -> SplitState:
    """Route each key to the base model or the adapter; adapter keys get PEFT's in-model names
    (`X.lora_A.default.weight`, `X.modules_to_save.default.weight`)."""
    state = strip_prefix(state)
    names = Counter(m.group("name") for k in state if (m := _LORA.match(k)) and m.group("name"))
    names.update(k.split(".modules_to_save.", 1)[1].split(".", 1)[0] for k in state if ".modules_to_save." in k)
    name = adapter_name or (names.most_common(1)[0][0] if names else DEFAULT_ADAPTER)
    base: dict[str, torch.Tensor] = {}
    adapter: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = _LORA.match(k)
        if m:
            adapter[f"{m.group('mod')}.{m.group('part')}.{m.group('name') or name}.{m.group('param')}"] = v
        elif ".base_layer." in k:
            base[k.replace(".base_layer.", ".", 1)] = v
        elif ".original_module." in k:
            base[k.replace(".original_module.", ".", 1)] = v
        elif ".modules_to_save." in k:
            mod, rest = k.split(".modules_to_save.", 1)
            adapter[f"{mod}.modules_to_save.{rest}"] = v
        elif modules_to_save and (mod := _in_modules_to_save(k, modules_to_save)) is not None:
            adapter[f"{mod}.modules_to_save.{name}.{k[len(mod) + 1:]}"] = v  # adapter files: no wrapper names
        else:
            base[k] = v
    return SplitState(base, adapter, name)


# ---------------------------------------------------------------- reading adapters


def read_adapter_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"adapter config {str(path)!r} is not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"adapter config {str(path)!r} holds a {type(cfg).__name__}; expected a JSON object")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise CheckpointError(f"adapter config {str(path)!r} has peft_type {kind!r}; nanscope replays LoRA adapters only")
    return cfg


def adapter_config_near(checkpoint: Path) -> Path | None:
    """`adapter_config.json` in the checkpoint's folder (a folder given itself counts), if there."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    p = folder / ADAPTER_CONFIG
    return p if p.is_file() else None


def read_adapter(path: Path, *, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Path | None]:
    """An adapter folder (save_pretrained) or a file of LoRA weights -> (state, config or None, config path)."""
    from nanscope.stacks.formats.checkpoint import read_state_dict

    if path.is_dir():
        weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise CheckpointError(f"adapter folder {str(path)!r} holds no {' or '.join(ADAPTER_WEIGHTS)}; expected a "
                                  "folder written by PeftModel.save_pretrained")
        cfg_path = path / ADAPTER_CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"adapter folder {str(path)!r} has no {ADAPTER_CONFIG}; expected a folder written "
                                  "by PeftModel.save_pretrained")
        return read_state_dict(weights, trust=trust), read_adapter_config(cfg_path), cfg_path
    if not path.is_file():
        raise CheckpointError(f"adapter {str(path)!r} does not exist; expected a PEFT adapter folder or file")
    cfg_path = adapter_config_near(path)
    return read_state_dict(path, trust=trust), (read_adapter_config(cfg_path) if cfg_path else None), cfg_path


def local_base(folder: Path, config: Mapping[str, Any], accept: Any = Path.is_file) -> Path | None:
    """The adapter config's base_model_name_or_path as a local path (as given, or relative to the adapter
    folder) that `accept` takes (default: a file), or None."""
    name = str(config.get("base_model_name_or_path") or "")
    return next((c for c in (Path(name), folder / name) if name and accept(c)), None)


def base_checkpoint_of(folder: Path, config: Mapping[str, Any]) -> Path:
    """The base checkpoint an adapter folder names (base_model_name_or_path) when it is a local file."""
    found = local_base(folder, config)
    if found is not None:
        return found
    name = str(config.get("base_model_name_or_path") or "")
    raise CheckpointError(
        f"{str(folder)!r} is a PEFT adapter folder: it holds only the LoRA weights, not the model. Pass the base "
        f"checkpoint it was trained from as CHECKPOINT and this folder as --adapter {folder} (its "
        f"base_model_name_or_path is {name or None!r}, which is not a local file)"
    )


def adapter_alone_message(folder: Path, command: str = "inspect") -> str | None:
    """What `nanscope inspect ADAPTER_DIR` with nothing else needs, or None when `folder` is no adapter folder
    (a folder holding adapter_config.json, as PEFT's save_pretrained and trainers' save_lora_adapters write)."""
    cfg_file = folder / ADAPTER_CONFIG
    if not folder.is_dir() or not cfg_file.is_file():
        return None
    cfg = read_adapter_config(cfg_file)
    name = str(cfg.get("base_model_name_or_path") or "")
    local = local_base(folder, cfg)
    base = (f"its base checkpoint {str(local)!r} (adapter_config.json's base_model_name_or_path) is found and read "
            f"with it" if local is not None else
            f"the base checkpoint it was trained from as CHECKPOINT and this folder as --adapter {folder} "
            f"(adapter_config.json names base_model_name_or_path {name or None!r}, which is not a local file)")
    weights = [w for w in ADAPTER_WEIGHTS if (folder / w).is_file()]
    return (f"{str(folder)!r} is a PEFT adapter folder ({', '.join([ADAPTER_CONFIG, *weights])}): it holds only the "
            f"LoRA weights (r={cfg.get('r')}, lora_alpha={cfg.get('lora_alpha')}), not the model or the data. "
            f"{command} needs a batch too: pass `nanscope {command} {folder} BATCH`, where {base}"
            if local is not None else
            f"{str(folder)!r} is a PEFT adapter folder ({', '.join([ADAPTER_CONFIG, *weights])}): it holds only the "
            f"LoRA weights (r={cfg.get('r')}, lora_alpha={cfg.get('lora_alpha')}), not the model or the data. "
            f"{command} needs {base}, and a batch: `nanscope {command} BASE_CHECKPOINT BATCH --adapter {folder}`")


def trainable_only_error(source: str, split: SplitState, fraction: float, n_model: int,
                         config: Mapping[str, Any] | None = None) -> CheckpointError:
    """The message for a file of LoRA (and unfrozen) weights given without its base checkpoint."""
    lora = sorted({k.split(".lora_")[0] for k in split.adapter if ".lora_" in k})
    base = str((config or {}).get("base_model_name_or_path") or "")
    named = f" (its adapter_config.json names {base!r})" if base else " (e.g. groundingdino_swint_ogc.pth)"
    return CheckpointError(
        f"{source} holds only the trainable weights of a PEFT model ({len(split.adapter)} adapter tensors on "
        f"{len(lora)} LoRA modules such as {', '.join(lora[:2]) or '-'}, and {len(split.base)} other tensors: "
        f"{fraction:.0%} of the {n_model} base model weights). It needs the base checkpoint it was trained "
        f"from{named}: pass that as CHECKPOINT and this file as --adapter FILE"
    )


# ---------------------------------------------------------------- applying


def _lora_config(peft: Any, split: SplitState, cfg: Mapping[str, Any] | None) -> tuple[Any, bool]:
    """A LoraConfig from adapter_config.json, else inferred from the keys (ranks from lora_A shapes)."""
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    ranks = {k.split(".lora_A.")[0]: int(v.shape[0]) for k, v in split.adapter.items() if ".lora_A." in k}
    mts = sorted({k.split(".modules_to_save.")[0] for k in split.adapter if ".modules_to_save." in k})
    if cfg is not None:
        kw = {k: v for k, v in cfg.items() if k in fields and k not in ("peft_type", "task_type", "inference_mode",
                                                                          "base_model_name_or_path", "revision")}
        return peft.LoraConfig(**kw, inference_mode=False), False
    if not ranks and not mts:
        raise CheckpointError("the PEFT state dict holds no lora_A weights and no modules_to_save; nothing to apply")
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {m: n for m, n in ranks.items() if n != r}
    use_dora = any(".lora_magnitude_vector." in k for k in split.adapter)
    return peft.LoraConfig(r=r, lora_alpha=DEFAULT_LORA_ALPHA, target_modules=sorted(ranks) or None,
                           rank_pattern=pattern, modules_to_save=mts or None, use_dora=use_dora,
                           inference_mode=False), True


def peft_keys(model: nn.Module) -> list[str]:
    """State-dict keys of an injected model that belong to the adapter."""
    return [k for k in model.state_dict() if _LORA.match(k) or ".modules_to_save." in k]


def apply_adapter(model: nn.Module, split: SplitState, cfg: Mapping[str, Any] | None, *, source: str,
                  config_file: str | None = None, merge: bool = False) -> tuple[nn.Module, Any, AdapterInfo]:
    """Wrap `model` (base weights already loaded) with the adapter, load its weights, merge on request.

    Returns `(model, KeyFit of the adapter keys, AdapterInfo)`; the model is the detector itself (PEFT's
    layers inside it when unmerged), never the PeftModel wrapper."""
    from nanscope.stacks.formats.checkpoint import KeyFit, key_fit

    peft = _import_peft()
    lcfg, assumed = _lora_config(peft, split, cfg)
    try:
        wrapped = peft.get_peft_model(model, lcfg, adapter_name=split.adapter_name)
    except (ValueError, NotImplementedError) as exc:  # target modules not found; a model PEFT cannot inspect
        raise CheckpointError(f"{source}: PEFT could not apply the adapter to this model ({exc})") from None
    inner = wrapped.get_base_model()
    fit = key_fit(inner, split.adapter)
    wanted = set(peft_keys(inner))
    fit = KeyFit(fit.matched, tuple(k for k in fit.missing if k in wanted), fit.unexpected, fit.mismatched,
                 fit.benign, fit.converted, fit.tied_differ)
    inner.load_state_dict({k: split.adapter[k] for k in fit.matched}, strict=False)
    targets = tuple(sorted(n for n, m in inner.named_modules() if hasattr(m, "lora_A") and split.adapter_name in m.lora_A))
    info = AdapterInfo(source, targets, int(lcfg.r), float(lcfg.lora_alpha), assumed,
                       tuple(sorted({k.split(".modules_to_save.")[0] for k in wanted if ".modules_to_save." in k})),
                       bool(lcfg.use_rslora), bool(lcfg.use_dora), merge, config_file)
    out = wrapped.merge_and_unload() if merge else inner
    return out, fit, info


def applied_note(where: str, info: AdapterInfo, merge: bool) -> str:
    """NS306's note on an adapter `apply_adapter` applied."""
    return (f"LoRA adapter from {where} applied {'merged' if merge else 'unmerged, through PEFT layers'} "
            f"(r={info.r}, lora_alpha={info.lora_alpha:g}, {len(info.targets)} modules)")


def combine_fits(base: Any, adapter: Any, info: AdapterInfo, notes: tuple[str, ...] = ()) -> Any:
    """One KeyFit for the base checkpoint and the adapter together."""
    from nanscope.stacks.formats.checkpoint import KeyFit

    return KeyFit(tuple(sorted(base.matched + adapter.matched)), base.missing + adapter.missing,
                  base.unexpected + adapter.unexpected, base.mismatched + adapter.mismatched,
                  base.benign + adapter.benign, base.converted + adapter.converted,
                  base.tied_differ + adapter.tied_differ, base.notes + notes, info)


# ---------------------------------------------------------------- live models (watch dumps)


def live_adapter_config(model: nn.Module) -> dict[str, Any] | None:
    """The active LoRA adapter's config of a PEFT-wrapped `model` as JSON values, or None when unwrapped."""
    m: Any = model
    for _ in range(8):
        cfgs = getattr(m, "peft_config", None)
        if isinstance(cfgs, Mapping) and cfgs:
            name = getattr(m, "active_adapter", None)
            name = name if isinstance(name, str) and name in cfgs else next(iter(cfgs))
            cfg = cfgs[name]
            if str(getattr(cfg, "peft_type", "")).upper().endswith("LORA") and hasattr(cfg, "to_dict"):
                return json.loads(json.dumps(cfg.to_dict(), default=_json_default))
            return None
        inner = next((getattr(m, a) for a in ("module", "_orig_mod") if isinstance(getattr(m, a, None), nn.Module)),
                     None)
        if inner is None:
            break
        m = inner
    for sub in model.modules():
        if sub is not model and isinstance(getattr(sub, "peft_config", None), Mapping):
            return live_adapter_config(sub)
    return _config_from_layers(model)


def _config_from_layers(model: nn.Module) -> dict[str, Any] | None:
    """The LoRA config of layers injected without a PeftModel (`peft.inject_adapter_in_model`), read from
    the layers themselves: rank, alpha and rsLoRA (scaling alpha / sqrt(r)) per module."""
    layers = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "r", None), dict)
              and isinstance(getattr(m, "lora_alpha", None), dict) and hasattr(m, "base_layer") and m.r}
    if not layers:
        return None
    name = next(iter(next(iter(layers.values())).r))
    ranks = {n: int(m.r[name]) for n, m in layers.items() if name in m.r}
    alphas = {n: float(m.lora_alpha[name]) for n, m in layers.items() if name in m.lora_alpha}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    n0, first = next(iter(layers.items()))
    rslora = ranks[n0] > 1 and math.isclose(float(first.scaling[name]), alphas[n0] / math.sqrt(ranks[n0]))
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {n: v for n, v in ranks.items() if v != r},
            "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
            "use_rslora": rslora, "use_dora": bool(getattr(first, "use_dora", {}).get(name, False))}


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if all(isinstance(v, str) for v in value) else list(value)
    if hasattr(value, "value"):  # enums (peft_type, task_type)
        return value.value
    return str(value)
