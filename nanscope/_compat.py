"""Old import paths (before the stage layout) keep working for one release, with a DeprecationWarning.

`import nanscope.batch` gives the module `nanscope.replay.batch` itself (not a copy), so monkeypatching
and `isinstance` checks see the same objects. New code imports the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module -> new module
ALIASES: dict[str, str] = {
    "nanscope._nonfinite_mode": "nanscope.trace._mode",
    "nanscope._nonfinite_rules": "nanscope.trace._rules",
    "nanscope.batch": "nanscope.replay.batch",
    "nanscope.positive_map": "nanscope.replay.positive_map",
    "nanscope.diagnose": "nanscope.replay.diagnose",
    "nanscope.module_stats": "nanscope.replay.module_stats",
    "nanscope.capture": "nanscope.stacks.capture",
    "nanscope.checkpoint": "nanscope.stacks.checkpoint",
    "nanscope.models": "nanscope.stacks",
    "nanscope.models.groundingdino": "nanscope.stacks.groundingdino_py",
    "nanscope.models.demo": "nanscope.stacks.demo",
    "nanscope.models.tiny_text": "nanscope.stacks.tiny_text",
    "nanscope.focal": "nanscope.criterion.focal",
    "nanscope.matcher": "nanscope.criterion.matcher",
    "nanscope.presets": "nanscope.criterion.presets",
    "nanscope.text_mask": "nanscope.criterion.text_mask",
    "nanscope.verify_checks": "nanscope.verify.checks",
    "nanscope.peak_memory": "nanscope.verify.peak_memory",
    "nanscope.watch_report": "nanscope.watch.report",
    "nanscope.snapshot": "nanscope.watch.snapshot",
    "nanscope.ranks": "nanscope.watch.ranks",
    "nanscope.commands": "nanscope.cli",
    "nanscope.commands.report": "nanscope.cli.report",
    "nanscope.commands.verify_fix": "nanscope.cli.verify_fix",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in ALIASES:
            return None
        is_package = fullname in ("nanscope.models", "nanscope.commands")
        return importlib.machinery.ModuleSpec(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return types.ModuleType(spec.name)  # a placeholder: exec_module puts the real module in its place

    def exec_module(self, module: types.ModuleType) -> None:
        new = ALIASES[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        # The import system returns whatever sys.modules holds for the name once exec_module is done.
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())  # first: an aliased package would let the path finder load copies
