"""Load and call a user's criterion given as `MODULE:ATTR` (a dotted module or a path to a .py file).

Protocol: `ATTR` is a class (instantiated with no arguments), a factory taking no arguments (called
once), or the criterion itself; the criterion is called as `criterion(outputs, targets)` and returns a
dict of loss terms (DETR convention). Errors name the user's own frame (file:line), not nanscope's.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from nanscope.errors import CriterionError

Criterion = Callable[[Mapping[str, Any], list[Mapping[str, torch.Tensor]]], Mapping[str, torch.Tensor]]

_INTERNAL = (f"{Path(torch.__file__).parent}", f"{Path(__file__).parent}", "<frozen ", "importlib")


def user_frame(exc: BaseException) -> str:
    """'file.py:12 in fn: line text' for the innermost frame outside torch and nanscope."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if not f.filename.startswith(_INTERNAL)]
    f = (mine or frames or [None])[-1]
    if f is None:
        return "<unknown>"
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _import(module: str) -> Any:
    if module.endswith(".py") or "/" in module or "\\" in module:
        path = Path(module)
        if not path.is_file():
            raise CriterionError(f"criterion file {module!r} does not exist")
        name = f"nanscope_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CriterionError(f"criterion file {module!r} cannot be imported as Python")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def load_criterion(spec: str) -> tuple[Criterion, str]:
    """`'pkg.losses:SetCriterion'` or `'path/losses.py:make'` -> (callable criterion, display name)."""
    if ":" not in spec.replace(":\\", ""):
        raise CriterionError(f"criterion {spec!r} is not MODULE:ATTR; expected e.g. 'mypkg.losses:SetCriterion'")
    module, _, attr = spec.rpartition(":")
    try:
        mod = _import(module)
    except CriterionError:
        raise
    except Exception as exc:
        raise CriterionError(f"criterion module {module!r} failed to import: {type(exc).__name__}: {exc} "
                             f"(at {user_frame(exc)})") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(mod) if not n.startswith("_"))[:20]
            raise CriterionError(f"criterion module {module!r} has no attribute {attr!r}; it has {', '.join(names)}")
        obj = getattr(obj, part)
    try:
        if inspect.isclass(obj):
            crit = obj()
        elif callable(obj) and _required_params(obj) == 0:
            crit = obj()
        else:
            crit = obj
    except Exception as exc:
        raise CriterionError(f"criterion {spec!r} raised while being created: {type(exc).__name__}: {exc} "
                             f"(at {user_frame(exc)})") from None
    if not callable(crit):
        raise CriterionError(f"criterion {spec!r} gave a {type(crit).__name__}, which is not callable")
    return crit, spec


def _required_params(fn: Callable[..., Any]) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return -1
    return sum(1 for p in sig.parameters.values()
               if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def call_criterion(crit: Criterion, outputs: Mapping[str, Any], targets: list[Mapping[str, torch.Tensor]],
                   *, name: str = "criterion") -> dict[str, torch.Tensor]:
    """Run the criterion; its exceptions become `CriterionError` naming the user's frame."""
    try:
        terms = crit(outputs, targets)
    except Exception as exc:
        raise CriterionError(f"{name} raised {type(exc).__name__}: {exc} (at {user_frame(exc)})") from None
    if isinstance(terms, torch.Tensor):
        terms = {"loss": terms}
    if not isinstance(terms, Mapping):
        raise CriterionError(f"{name} returned a {type(terms).__name__}; expected a dict of loss tensors")
    out = {str(k): v for k, v in terms.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise CriterionError(f"{name} returned no tensor loss terms (keys: {', '.join(map(str, terms))})")
    return out
