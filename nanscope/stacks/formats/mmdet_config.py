"""MMDetection `.py` configs read as data: the syntax tree is evaluated, never the code.

An mmdet config is Python: assignments of literals, `dict(...)` calls, names assigned earlier, `_base_`
files and `{{_base_.name}}` references. `read_mmdet_config(path)` evaluates exactly those (plus arithmetic
on numbers and `+` on lists) from `ast.parse`, merges `_base_` files found beside it the way MMEngine does
(child dicts merge into the base's unless `_delete_=True`), and leaves out every other statement or value,
naming it in `skipped`. Nothing is imported or executed, so a config never needs trusting.
`read_config_text(text)` reads the resolved config MMEngine stores in a checkpoint's `meta['cfg']`.
"""

from __future__ import annotations

import ast
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanscope.errors import ConfigError
from nanscope.stacks.formats.safe_config import BASE_KEY, MAX_BASE_DEPTH, _merge

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}


class _Unknown(Exception):
    """An expression the data reader does not evaluate (a call, a comprehension, an import, ...)."""


@dataclass
class MmdetConfig:
    values: dict[str, Any]
    source: str
    skipped: list[str] = field(default_factory=list)  # names whose value was code, not data

    def get(self, path: str, default: Any = None) -> Any:
        """The value at a dotted path ('model.bbox_head.contrastive_cfg.max_text_len'), else `default`."""
        node: Any = self.values
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node


def _eval(node: ast.AST, scope: Mapping[str, Any], base: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_eval(e, scope, base) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _Unknown("**")
        return {_eval(k, scope, base): _eval(v, scope, base) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        if any(kw.arg is None for kw in node.keywords):
            raise _Unknown("**")
        return {kw.arg: _eval(kw.value, scope, base) for kw in node.keywords}
    if isinstance(node, ast.Name):
        if node.id in scope:
            return scope[node.id]
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        raise _Unknown(node.id)
    if isinstance(node, ast.Set) and len(node.elts) == 1 and isinstance(node.elts[0], ast.Set):
        return _base_ref(node.elts[0].elts[0], base)  # {{_base_.name}}
    if isinstance(node, ast.Attribute):
        return _base_ref(node, base)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, scope, base)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, scope, base), _eval(node.right, scope, base)
        if isinstance(left, (int, float)) and isinstance(right, (int, float)) or \
                (isinstance(node.op, ast.Add) and type(left) is type(right) and isinstance(left, (list, tuple, str))):
            return _BINOPS[type(node.op)](left, right)
    raise _Unknown(type(node).__name__)


def _base_ref(node: ast.AST, base: Mapping[str, Any]) -> Any:
    """`_base_.a.b` -> the base config's value at a.b."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not (isinstance(node, ast.Name) and node.id == BASE_KEY):
        raise _Unknown("attribute")
    value: Any = base
    for part in reversed(parts):
        if not isinstance(value, Mapping) or part not in value:
            raise _Unknown(f"_base_.{'.'.join(reversed(parts))}")
        value = value[part]
    return value


def _read_text(text: str, source: str, base: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """(values, the `_base_` names, skipped names) of one config's text."""
    try:
        tree = ast.parse(text, filename=source)
    except SyntaxError as exc:
        raise ConfigError(f"config {source!r} is not valid Python (line {exc.lineno}: {exc.msg}); expected an "
                          "MMDetection config") from None
    scope: dict[str, Any] = {}
    skipped: list[str] = []
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                skipped.append(ast.unparse(stmt).split("=")[0].strip())
            continue
        name = stmt.targets[0].id
        try:
            scope[name] = _eval(stmt.value, scope, base)
        except (_Unknown, TypeError, ZeroDivisionError, ValueError):
            skipped.append(name)
    bases = scope.pop(BASE_KEY, [])
    return scope, [bases] if isinstance(bases, str) else list(bases), skipped


def read_config_text(text: str, source: str = "meta['cfg']") -> MmdetConfig:
    """A resolved config text (a checkpoint's `meta['cfg']`), read as data."""
    values, _, skipped = _read_text(text, source, {})
    return MmdetConfig(values, source, skipped)


def read_mmdet_config(path: str | os.PathLike[str], *, _depth: int = 0) -> MmdetConfig:
    """An mmdet `.py` config with its `_base_` files (those beside it), read as data."""
    p = Path(path)
    if _depth > MAX_BASE_DEPTH:
        raise ConfigError(f"config {str(p)!r}: `_base_` files nest deeper than {MAX_BASE_DEPTH}; is there a loop?")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; expected an MMDetection .py config")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} could not be read: {exc}") from None
    # the base files first (their values resolve `{{_base_.x}}`), then this file over them
    _, names, _ = _read_text(text, str(p), {})
    base: dict[str, Any] = {}
    skipped: list[str] = []
    for name in names:
        f = p.parent / name
        if f.is_file():
            sub = read_mmdet_config(f, _depth=_depth + 1)
            base = _merge(sub.values, base)
            skipped += sub.skipped
        else:
            skipped.append(f"_base_ {name} (not found beside {p.name})")
    values, _, own_skipped = _read_text(text, str(p), base)
    return MmdetConfig(_merge(values, base), str(p), skipped + own_skipped)
