"""The `MODULE:ATTR` and `MODULE:ATTR(arg, name=value, ...)` spec of a user's criterion.

The call is read with `ast.parse(mode='eval')` and only these nodes are accepted:

* literals: numbers, strings, bytes, None/True/False, and lists, tuples, dicts and sets of them,
  a unary minus or plus on a number;
* calls whose function is a bare name defined in MODULE (looked up on the imported module), with
  arguments of the same kinds: `SetCriterion(matcher=HungarianMatcher(cost_class=2.0), losses=['labels'])`.

Anything else (attribute access, a name MODULE does not define, lambdas, comprehensions,
subscripts, f-strings, `*`/`**`) is a `SpecError` naming the node and its column; nothing outside
MODULE is looked up and nothing but MODULE's own callables is called (importing MODULE runs the
user's own file, as asked). A callable that takes a parameter named `args` and is not given one gets
the checkpoint's saved `argparse.Namespace` (Open-GroundingDino's `args`) when a provider is given
and the checkpoint has one.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from nanscope.errors import CriterionError, SpecError

EXAMPLE = ("'mypkg.losses:SetCriterion' or 'losses.py:build_criterion(num_classes=3, eos_coef=0.1)' or "
           "'main.py:SetCriterion(matcher=HungarianMatcher(cost_class=2.0), losses=[\"labels\"])'")
SAVED_ARGS = "args"  # the parameter name that receives the checkpoint's saved argparse.Namespace
ArgsProvider = Callable[[], Any]  # () -> the checkpoint's saved args, or None when it has none


@dataclass(frozen=True)
class Spec:
    """A parsed spec: MODULE, ATTR and the call after the colon (None: no parentheses)."""

    module: str
    attr: str
    call: ast.Call | None
    text: str
    offset: int = 0  # column of the call's first character in `text` (for error messages)


def parse_spec(spec: str) -> Spec:
    """`'losses.py:build(a=1)'` -> Spec('losses.py', 'build', <ast.Call>); nodes are checked in `evaluate`'s
    rules here already, except which names MODULE defines (that needs the import)."""
    head, paren, _ = spec.partition("(")
    if ":" not in head.replace(":\\", "") or head.endswith(":"):
        raise CriterionError(f"criterion {spec!r} is not MODULE:ATTR; expected e.g. {EXAMPLE}")
    module, _, attr = head.rpartition(":")
    attr = attr.strip()
    if not paren:
        return Spec(module, attr, None, spec)
    raw = spec[len(module) + 1:]
    call_src = raw.strip()
    try:
        node = ast.parse(call_src, mode="eval").body
    except SyntaxError as exc:
        raise SpecError(f"criterion {spec!r}: {call_src!r} is not a call ATTR(arg=value, ...) "
                        f"({exc.msg}); expected e.g. {EXAMPLE}") from None
    if not isinstance(node, ast.Call) or ast.unparse(node.func) != attr:
        raise SpecError(f"criterion {spec!r}: expected one call of {attr}(arg=value, ...) after the colon")
    parsed = Spec(module, attr, node, spec, len(module) + 1 + len(raw) - len(raw.lstrip()))
    _check_arguments(node, parsed, names=None)
    return parsed


def _refuse(node: ast.AST, spec: Spec, why: str) -> SpecError:
    col = spec.offset + getattr(node, "col_offset", 0) + 1  # 1-based, in the whole spec
    return SpecError(f"criterion {spec.text!r}: {ast.unparse(node)!r} ({type(node).__name__} at column {col}) "
                     f"{why}; accepted are literals (numbers, strings, "
                     "None/True/False, lists, tuples, dicts, sets of them) and calls of names MODULE defines, "
                     "nothing is evaluated")


def _check_arguments(call: ast.Call, spec: Spec, names: Any) -> None:
    for a in call.args:
        if isinstance(a, ast.Starred):
            raise _refuse(a, spec, "unpacks with '*'; write each argument")
        _check_value(a, spec, names)
    for kw in call.keywords:
        if kw.arg is None:
            raise _refuse(kw.value, spec, "is passed with '**'; write each keyword argument")
        _check_value(kw.value, spec, names)


def _check_value(node: ast.AST, spec: Spec, names: Any) -> None:
    """Raise unless `node` is a literal or an allowed call (`names`: MODULE, or None before the import)."""
    if isinstance(node, ast.Constant):
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float, complex)) \
            and not isinstance(node.operand.value, bool):
        return
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        for e in node.elts:
            _check_value(e, spec, names)
        return
    if isinstance(node, ast.Dict):
        for k in node.keys:
            if k is None:
                raise _refuse(node, spec, "unpacks a dict with '**'")
            _check_value(k, spec, names)
        for v in node.values:
            _check_value(v, spec, names)
        return
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise _refuse(node.func, spec, "is not a bare name (only calls of names MODULE defines are accepted)")
        if names is not None and not callable(getattr(names, node.func.id, None)):
            raise _refuse(node.func, spec, "is not a callable that MODULE defines")
        _check_arguments(node, spec, names)
        return
    raise _refuse(node, spec, "is not accepted")


def evaluate(spec: Spec, obj: Any, module: Any, where: Callable[[Any], str],
             saved_args: ArgsProvider | None = None) -> Any:
    """Call `obj` (ATTR) as the spec says, building nested calls of MODULE's names first (inside out)."""
    assert spec.call is not None
    _check_arguments(spec.call, spec, module)
    args, kwargs = _arguments(spec.call, spec, module, where, saved_args)
    return call_checked(obj, args, kwargs, spec.text, where(obj), saved_args)


def _arguments(call: ast.Call, spec: Spec, module: Any, where: Callable[[Any], str],
               saved_args: ArgsProvider | None) -> tuple[list[Any], dict[str, Any]]:
    args = [_value(a, spec, module, where, saved_args) for a in call.args]
    kwargs = {str(kw.arg): _value(kw.value, spec, module, where, saved_args) for kw in call.keywords}
    return args, kwargs


def _value(node: ast.AST, spec: Spec, module: Any, where: Callable[[Any], str],
           saved_args: ArgsProvider | None) -> Any:
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)  # _check_value refused anything else
        fn = getattr(module, node.func.id)
        args, kwargs = _arguments(node, spec, module, where, saved_args)
        return call_checked(fn, args, kwargs, spec.text, where(fn), saved_args)
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_value(e, spec, module, where, saved_args) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items) if isinstance(node, ast.Tuple) else set(items)
    if isinstance(node, ast.Dict):
        return {_value(k, spec, module, where, saved_args): _value(v, spec, module, where, saved_args)
                for k, v in zip(node.keys, node.values) if k is not None}
    return ast.literal_eval(node)  # a constant or a signed number (checked above)


def needs_saved_args(obj: Any, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Whether `obj` has a parameter named `args` that this call leaves unfilled."""
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return False
    for i, p in enumerate(params):
        if p.name == SAVED_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY):
            return SAVED_ARGS not in kwargs and not (p.kind is not p.KEYWORD_ONLY and i < len(args))
    return False


def call_checked(obj: Any, args: list[Any], kwargs: dict[str, Any], spec: str, where: str,
                 saved_args: ArgsProvider | None = None) -> Any:
    """`obj(*args, **kwargs)` after checking them against its signature (errors point at `where`); a missing
    `args` parameter gets the checkpoint's saved Namespace when `saved_args` gives one."""
    if not callable(obj):
        raise CriterionError(f"criterion {spec!r}: {type(obj).__name__} is not callable, so it takes no arguments")
    if saved_args is not None and needs_saved_args(obj, args, kwargs):
        ns = saved_args()
        if ns is not None:
            kwargs = {**kwargs, SAVED_ARGS: ns}
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj(*args, **kwargs)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        params = sig.parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in kwargs if k not in params and not takes_any]
        bound = set(list(params)[:len(args)]) | set(kwargs)
        missing = [n for n, p in params.items() if p.default is p.empty and n not in bound
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        accepted = ", ".join(n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        parts = ([f"it takes no {', '.join(unknown)}"] if unknown else []) + \
                ([f"it also needs {', '.join(missing)}"] if missing else []) + ([] if unknown or missing else [str(exc)])
        if SAVED_ARGS in missing:
            parts.append("('args' is filled from the checkpoint's saved argparse.Namespace when it has one, as "
                         "Open-GroundingDino's checkpoints do; this one has none)" if saved_args is not None else
                         "('args' is filled from the checkpoint's saved argparse.Namespace once a checkpoint is "
                         "given)")
        raise CriterionError(f"criterion {spec!r}: {'; '.join(parts)} ({getattr(obj, '__name__', obj)} at {where} "
                             f"takes {accepted or 'no arguments'})") from None
    return obj(*args, **kwargs)
