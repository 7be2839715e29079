"""The training arguments a checkpoint carries (Open-GroundingDino saves `args`, an `argparse.Namespace`).

Read only when a criterion factory asks for `args` (`nanscope.user_spec`): a zip checkpoint is opened
with `mmap=True`, so the tensors are mapped, not read, and nothing but tensors, containers and
`argparse.Namespace` is unpickled (`weights_only`, as `nanscope.stacks.formats.checkpoint` loads it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from nanscope.stacks.formats.checkpoint import SAFE_GLOBALS, file_kind, read_checkpoint


def saved_args(path: str | os.PathLike[str] | None, *, trust: bool = False) -> argparse.Namespace | None:
    """The `args` Namespace saved in the checkpoint at `path`, or None (no path, a folder, no `args`)."""
    if path is None or not Path(path).is_file():
        return None
    p = Path(path)
    if file_kind(p) == "zip":
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            try:
                obj: Any = torch.load(p, map_location="cpu", weights_only=not trust, mmap=True)
            except Exception:
                obj = read_checkpoint(p, trust=trust)  # its own errors name what is wrong
    else:
        obj = read_checkpoint(p, trust=trust)
    args = obj.get("args") if isinstance(obj, dict) else None
    return args if isinstance(args, argparse.Namespace) else None
