"""Bounds on what a loaded file may hold, checked once on load before any pass over the data.

A 100-byte batch can hold a tensor expanded with stride 0 to logical shape [1e6, 1e6] (a non-finite
check would allocate 4 TB), a list nested seven deep by shared references (1.3e9 leaves for a loop
that follows them) or 1e6 boxes. `check_loaded(obj, source)` walks the object once, each shared
container once (memory and time stay those of the file), and raises the error class given naming
`source` and the field: more than MAX_LEAVES leaves once shared references are counted as often as
a reader would visit them, nesting past MAX_DEPTH, or a tensor whose logical size is past
MAX_ELEMENTS (or past MAX_EXPANDED_ELEMENTS when it is a stride-0 expansion of a smaller storage).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nanscope.errors import InputError

MAX_LEAVES = 1_000_000  # values a reader may visit (a batch holds a few thousand; a state dict ~1000 tensors)
MAX_DEPTH = 32  # a batch nests 4 levels, a training checkpoint about 6
MAX_ELEMENTS = 1 << 31  # logical elements of one tensor (8 GiB of float32): past any image batch or weight
MAX_EXPANDED_ELEMENTS = 1 << 26  # logical elements of a stride-0 (expanded) tensor: a real batch never has one


def _tensor_problem(t: Any) -> str | None:
    numel = 1
    for s in t.shape:
        numel *= int(s)
    expanded = any(st == 0 and s > 1 for s, st in zip(t.shape, t.stride()))
    if numel > MAX_ELEMENTS and not expanded:
        return f"is a tensor of shape {list(t.shape)} ({numel:.3g} elements); expected at most {MAX_ELEMENTS:.3g}"
    if expanded and numel > MAX_EXPANDED_ELEMENTS:
        stored = t.untyped_storage().nbytes() // max(t.element_size(), 1)
        return (f"is a tensor of logical shape {list(t.shape)} ({numel:.3g} elements) expanded with stride 0 from "
                f"{stored} stored elements; any check over it would allocate the logical size. Expected a plain "
                f"tensor, or an expanded one of at most {MAX_EXPANDED_ELEMENTS:.3g} elements")
    return None


def check_loaded(obj: Any, source: str, *, error: type[InputError] = InputError) -> None:
    """Raise `error` naming `source` and the field when `obj` breaks a bound above; one pass, no recursion."""
    import torch

    leaves: dict[int, int] = {}  # id(container) -> leaves below it, counted as a reader would visit them
    on_path: set[int] = set()
    stack: list[tuple[Any, str, int, bool]] = [(obj, "", 0, False)]
    while stack:
        x, where, depth, done = stack.pop()
        name = f"{source} field {where.lstrip('.')}" if where else source
        is_container = isinstance(x, (Mapping, list, tuple))
        if not is_container:
            if isinstance(x, torch.Tensor):
                problem = _tensor_problem(x)
                if problem:
                    raise error(f"{name} {problem}")
            continue
        key = id(x)
        items = list(x.items()) if isinstance(x, Mapping) else list(enumerate(x))
        if done:
            on_path.discard(key)
            total = 0
            for _, v in items:
                total += leaves.get(id(v), 0) if isinstance(v, (Mapping, list, tuple)) else 1
            leaves[key] = total
            if total > MAX_LEAVES:
                raise error(f"{name} holds {total:.3g} values once its shared references are followed (a list nested "
                            f"by repeating one object); expected at most {MAX_LEAVES:.3g}")
            continue
        if key in leaves:
            continue
        if key in on_path:
            raise error(f"{name} contains itself (a reference cycle); expected plain nested lists and dicts")
        if depth > MAX_DEPTH:
            raise error(f"{name} nests deeper than {MAX_DEPTH} levels; expected plain nested lists and dicts")
        on_path.add(key)
        stack.append((x, where, depth, True))
        for k, v in items:
            if isinstance(v, (Mapping, list, tuple)) and id(v) in leaves:
                continue
            stack.append((v, f"{where}.{k}" if isinstance(x, Mapping) else f"{where}[{k}]", depth + 1, False))
