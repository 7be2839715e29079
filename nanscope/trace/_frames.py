"""Which Python frame to blame: the innermost one outside torch, torchvision, the standard library and the tracer.

A leaf of `nanscope.trace`: the op-level mode (`_mode`) and the module-level pass (`_calls`) both walk frames
with `user_frame`.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import types

FrameKey = tuple[types.CodeType, int]  # (code object, line): a Frame before it is spelled out


def _package_dir(name: str) -> str | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "")


_INTERNAL_DIRS = tuple(d for d in map(_package_dir, ("torch", "torchvision", "functorch")) if d)
_STDLIB = os.path.join(sysconfig.get_paths()["stdlib"], "")
_TRACER_FILES = frozenset(os.path.join(os.path.dirname(os.path.abspath(__file__)), f)
                          for f in ("__init__.py", "tracer.py", "_mode.py", "_rules.py", "records.py", "_frames.py",
                                    "_calls.py", "_replay.py", "_loss.py", "_phases.py", "_backward.py"))


def is_internal(filename: str) -> bool:
    """Frames never blamed: torch, torchvision, the standard library and the tracer itself.

    The rest of nanscope is not skipped: its criterion is loss code like any other.
    """
    if filename.startswith(("<", *_INTERNAL_DIRS)) or filename in _TRACER_FILES:
        return True
    return filename.startswith(_STDLIB) and "-packages" not in filename


def user_frame(cache: dict[types.CodeType, bool], *, depth: int = 2, stop: types.CodeType | None = None,
               at_stop: FrameKey | None = None) -> FrameKey | None:
    """The innermost non-internal frame above the caller's caller (`depth`), `cache`d per code object.

    Reaching the frame of code `stop` (the module-level replay's own call) returns `at_stop`: the line that
    called the replayed module in the real run.
    """
    f: types.FrameType | None = sys._getframe(depth)
    while f is not None:
        code = f.f_code
        if code is stop:
            return at_stop
        internal = cache.get(code)
        if internal is None:
            internal = cache[code] = is_internal(code.co_filename)
        if not internal:
            return code, f.f_lineno
        f = f.f_back
    return None
