"""Let `nanscope.capture(...)` and `nanscope.watch(...)` work although each shares its name with its module.

Importing `nanscope.capture` (the module) makes Python bind the package attribute `capture` to the module,
hiding the function of the same name that `nanscope/__init__.py` exports lazily. Calling such a module
calls its function instead; the module is otherwise unchanged.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Make `sys.modules[module_name]` callable as its same-named function."""
    sys.modules[module_name].__class__ = _CallableModule
