"""Arguments checked before any heavy work: criterion specs and `--config`, in milliseconds.

Reading a batch, building a model, loading weights or a tokenizer take from seconds (the demo) to
minutes (a full-size checkpoint); a typo in an argument must not wait for them. `criterion(spec)`
imports a `MODULE:ATTR` criterion (the user's module, never the model) and checks a short name
against the criteria the stacks ship; `config_stack(config, stack)` reads what kind of config a
`--config` file is (a groundingdino config or a transformers config.json) and returns the stack that
reads it, or says which `--stack` to pass. Nothing here imports torch, transformers or groundingdino
except what the user's criterion module imports itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nanscope.errors import ConfigError, CriterionError
from nanscope.stacks import STACK_ALIASES

SHIPPED_CRITERIA = {"transformers": "transformers"}  # short criterion name -> the stack that ships it
TRANSFORMERS_MODEL_TYPES = ("grounding-dino", "mm-grounding-dino")  # nanscope.stacks.transformers.loading.MODEL_CLASSES
GROUNDINGDINO_SUFFIXES = (".py", ".yaml", ".yml")  # groundingdino's config formats besides .json
GROUNDINGDINO, TRANSFORMERS = "groundingdino-py", "transformers"


def criterion(spec: Any, option: str = "--criterion", saved_args: Any = None) -> Any:
    """A `MODULE:ATTR` spec loaded now, as `(criterion, name)` (so an import error or a missing attribute
    fails before the replay); a short name the stacks ship, or anything already loaded, unchanged.
    saved_args: `nanscope.user_code.load_criterion`'s (the checkpoint's saved args, read only when asked for)."""
    if not isinstance(spec, str):
        return spec
    if ":" in spec.replace(":\\", ""):
        from nanscope.user_code import load_criterion

        return load_criterion(spec, saved_args=saved_args)
    if spec not in SHIPPED_CRITERIA:
        shipped = ", ".join(f"{k!r} (the {v} stack)" for k, v in SHIPPED_CRITERIA.items())
        raise CriterionError(f"{option} {spec!r} is not MODULE:ATTR (e.g. 'mypkg.losses:SetCriterion' or "
                             f"'losses.py:build(num_classes=3)'), nor a criterion a stack ships: {shipped}")
    return spec


def config_kind(config: str | os.PathLike[str]) -> tuple[str | None, str]:
    """(the stack that reads `config`, a description): transformers for a config.json with a GroundingDino
    `model_type` (or a folder holding one), groundingdino-py for a .py/.yaml config or a JSON one with
    `modelname` or `_base_`; None for a file whose kind only its loader can tell. Raises `ConfigError`
    for a config that does not exist, is not readable JSON, or is neither kind."""
    p = Path(config)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"--config {str(p)!r} is a folder without config.json; expected a groundingdino "
                              "config file (.py, .json) or a transformers config.json (or its save_pretrained folder)")
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"--config {str(p)!r} does not exist; expected a groundingdino config file (.py, .json) "
                          "or a transformers config.json")
    if p.suffix.lower() in GROUNDINGDINO_SUFFIXES:
        return GROUNDINGDINO, f"a groundingdino {p.suffix} config"
    if p.suffix.lower() != ".json":
        return None, "a config file"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"--config {str(p)!r} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(p)!r} holds a JSON {type(data).__name__}; expected an object")
    if "model_type" in data:
        kind = data["model_type"]
        if kind not in TRANSFORMERS_MODEL_TYPES:
            raise ConfigError(f"--config {str(p)!r} has model_type {kind!r}; expected a GroundingDINO config: a "
                              f"transformers config.json with model_type {' or '.join(map(repr, TRANSFORMERS_MODEL_TYPES))}"
                              ", or a groundingdino config (modelname 'groundingdino')")
        return TRANSFORMERS, f"a transformers config.json (model_type {kind!r})"
    if data.get("modelname") == "groundingdino" or "_base_" in data:
        return GROUNDINGDINO, "a groundingdino config"
    found = f"modelname {data['modelname']!r}" if "modelname" in data else f"keys {', '.join(list(data)[:6])}"
    raise ConfigError(f"--config {str(p)!r} has {found}; expected a groundingdino config (modelname "
                      "'groundingdino') or a transformers config.json (model_type 'grounding-dino')")


def config_stack(config: Any, stack: str | None) -> str | None:
    """The stack to replay with: `stack` when named, else the one `config` is for (None: detect from the
    checkpoint). A config of the other kind than a named stack reads is a `ConfigError` naming the stack
    that reads it. `config` that is not a path (a dump's recorded values) is left to the loader."""
    if not isinstance(config, (str, os.PathLike)) or not os.fspath(config):
        return stack
    kind, what = config_kind(config)
    named = STACK_ALIASES.get(stack, stack) if stack else None
    if kind is None or named is None:
        return stack if named is not None else (kind if kind == TRANSFORMERS else None)
    if named != kind:
        flag = "hf" if kind == TRANSFORMERS else kind
        raise ConfigError(f"--config {os.fspath(config)!r} is {what}, which the {kind} stack reads, not the {named} "
                          f"stack: pass --stack {flag} (or leave --stack out and nanscope detects it)")
    return stack
