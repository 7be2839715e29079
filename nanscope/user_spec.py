"""The `MODULE:ATTR` and `MODULE:ATTR(arg=value, ...)` spec of a user's criterion, parsed without running it.

The arguments are Python literals only (numbers, strings, bytes, tuples, lists, dicts, sets, True,
False, None), read with `ast.literal_eval`: no name is looked up and nothing is evaluated, so a spec
on a command line cannot run code by itself (importing MODULE runs the user's own file, as asked).
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

from nanscope.errors import CriterionError

EXAMPLE = "'mypkg.losses:SetCriterion' or 'losses.py:build_criterion(num_classes=3, eos_coef=0.1)'"


def parse_spec(spec: str) -> tuple[str, str, dict[str, Any] | None]:
    """`'losses.py:build(a=1)'` -> ('losses.py', 'build', {'a': 1}); no parentheses -> kwargs None."""
    head, paren, _ = spec.partition("(")
    if ":" not in head.replace(":\\", "") or head.endswith(":"):
        raise CriterionError(f"criterion {spec!r} is not MODULE:ATTR; expected e.g. {EXAMPLE}")
    module, _, attr = head.rpartition(":")
    attr = attr.strip()
    if not paren:
        return module, attr, None
    call_src = spec[len(module) + 1:].strip()
    try:
        node = ast.parse(call_src, mode="eval").body
    except SyntaxError as exc:
        raise CriterionError(f"criterion {spec!r}: {call_src!r} is not a call ATTR(arg=value, ...) "
                             f"({exc.msg}); expected e.g. {EXAMPLE}") from None
    if not isinstance(node, ast.Call) or ast.unparse(node.func) != attr:
        raise CriterionError(f"criterion {spec!r}: expected one call of {attr}(arg=value, ...) after the colon")
    if node.args:
        raise CriterionError(f"criterion {spec!r}: positional arguments are not accepted; name each one, "
                             f"e.g. {attr}(num_classes=3)")
    kwargs: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise CriterionError(f"criterion {spec!r}: '**' is not accepted; write each keyword argument")
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise CriterionError(
                f"criterion {spec!r}: {kw.arg}={ast.unparse(kw.value)} is not a Python literal; only numbers, "
                "strings, lists, tuples, dicts, True, False and None are accepted (nothing is evaluated)") from None
    return module, attr, kwargs


def call_with_literals(obj: Any, kwargs: dict[str, Any], spec: str, where: str) -> Any:
    """`obj(**kwargs)`, after checking the names against its signature (errors point at `where`)."""
    if not callable(obj):
        raise CriterionError(f"criterion {spec!r}: {type(obj).__name__} is not callable, so it takes no arguments")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj(**kwargs)
    params = sig.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not takes_any]
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if unknown or missing:
        accepted = ", ".join(n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        parts = ([f"it takes no {', '.join(unknown)}"] if unknown else []) + \
                ([f"it also needs {', '.join(missing)}"] if missing else [])
        raise CriterionError(f"criterion {spec!r}: {'; '.join(parts)} ({getattr(obj, '__name__', obj)} at {where} "
                             f"takes {accepted or 'no arguments'})")
    return obj(**kwargs)
