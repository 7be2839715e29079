"""Model families behind one seam (`base.Stack`): groundingdino-py first, transformers next.

Layout: one subpackage per model family (`groundingdino/`, `transformers/`: build, load, capture, demo),
`formats/` for checkpoint and config formats any family reads, and here what every family shares: the seam
(`base.py`), the capture records (`capture.py`), the tiny text encoder (`tiny_text.py`). Adding a stack is
one subpackage plus one line in `STACK_CLASSES`.

`get_stack(name)` by name, `stack_for_model(model)` for a live model (inside wrappers too), and
`stack_for_checkpoint(path)` for a file or folder a user names. The order of `STACK_CLASSES` is the
order of detection: more specific stacks first, groundingdino-py (any torch file) last.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from nanscope.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from nanscope.stacks.base import Stack

# name -> "module:Class"; modules are imported only when a stack is needed
STACK_CLASSES: dict[str, str] = {
    "groundingdino-py": "nanscope.stacks.groundingdino.stack:GroundingDinoPy",
    "transformers": "nanscope.stacks.transformers.stack:TransformersHF",
}
STACK_ALIASES = {"hf": "transformers", "gdpy": "groundingdino-py"}  # short names accepted wherever a stack is named
_INSTANCES: dict[str, "Stack"] = {}


def stack_names() -> list[str]:
    return list(STACK_CLASSES)


def get_stack(name: str) -> "Stack":
    """The stack called `name` (or one of its aliases); an unknown name lists the valid ones."""
    name = STACK_ALIASES.get(name, name)
    if name not in STACK_CLASSES:
        raise ConfigError(f"stack {name!r} is not known; expected one of {', '.join(STACK_CLASSES)}")
    if name not in _INSTANCES:
        module, _, cls = STACK_CLASSES[name].partition(":")
        _INSTANCES[name] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[name]


def _detection_order() -> list[str]:
    return [n for n in STACK_CLASSES if n != "groundingdino-py"] + ["groundingdino-py"]


def stack_for_model(model: "nn.Module") -> "Stack":
    """The stack whose model family `model` is (or holds inside DDP / PEFT / torch.compile wrappers)."""
    for name in _detection_order():
        try:
            stack = get_stack(name)
        except ImportError:  # the family's library is not installed: it cannot be this model
            continue
        if stack.owns(model):
            return stack
    raise ConfigError(f"no GroundingDINO module found inside {type(model).__name__}; nanscope knows "
                      f"{', '.join(STACK_CLASSES)} models")


def stack_for_checkpoint(path: str | Path, *, stack: str | None = None) -> "Stack":
    """The stack named by `stack`, else the first that claims `path`."""
    if stack is not None:
        return get_stack(stack)
    p = Path(path)
    for name in _detection_order():
        try:
            s = get_stack(name)
        except ImportError:
            continue
        if s.claims(p):
            return s
    if p.is_dir():
        raise ConfigError(f"{str(p)!r} is a folder that no stack reads ({', '.join(STACK_CLASSES)}); expected a "
                          "checkpoint file or a saved model folder")
    return get_stack("groundingdino-py")  # its loader says what is wrong with the file
