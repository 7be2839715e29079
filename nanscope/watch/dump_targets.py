"""The targets of a watch dump: nanscope's schema keys, the trainer's own keys, and what a replay would lack.

A trainer's target dict carries the schema keys (`boxes`, `phrases` or `tokens_positive`) and its own
(`labels`, `size`, `token_labels`, ...). The dump keeps the schema keys; a target with neither phrases
nor spans gets its phrases from `labels` indexing its `cap_list` (Open-GroundingDino's targets:
`cap_list[labels[j]]` is box j's name, found in the caption as its criterion finds it), else the
trainer's positive map as `positive_map` (from `positive_map` or `token_labels`, [N, T]); every other key under `extra` in a form `torch.load(weights_only=True)`
reads (tensors on the CPU, numpy arrays as tensors, numbers, strings, lists, dicts); anything else
is dropped and named in the notes. `replay_gaps` says, from keys and shapes only (no device read),
what a dump of a step would lack for `nanscope inspect DUMP`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

SCHEMA_TARGET_KEYS = ("boxes", "phrases", "tokens_positive", "positive_map")
POSITIVE_MAP_KEYS = ("positive_map", "token_labels")  # a trainer's own per-box token targets [N, T]
_DROP = object()


def portable(value: Any, depth: int = 0) -> Any:
    """`value` as weights_only-loadable data on the CPU, or `_DROP` when it cannot be."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if depth > 6:
        return _DROP
    if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        try:
            return torch.as_tensor(value).clone()
        except (TypeError, RuntimeError):
            return _DROP
    if isinstance(value, Mapping):
        out = {str(k): portable(v, depth + 1) for k, v in value.items() if isinstance(k, (str, int))}
        return _DROP if any(v is _DROP for v in out.values()) or len(out) != len(value) else out
    if isinstance(value, (list, tuple)):
        items = [portable(v, depth + 1) for v in value]
        return _DROP if any(v is _DROP for v in items) else items
    return _DROP


def user_positive_map(t: Mapping[str, Any]) -> Tensor | None:
    """The trainer's positive map [N, T] of a target (`positive_map`, else `token_labels`), if it has one."""
    for key in POSITIVE_MAP_KEYS:
        v = t.get(key)
        if isinstance(v, Tensor) and v.dim() == 2:
            return v
    return None


def phrases_from_labels(t: Mapping[str, Any]) -> list[str] | None:
    """`[cap_list[l] for l in labels]` of an Open-GroundingDino-shaped target (`labels` [N] indexing its own
    `cap_list`, a list of names), or None when it has no such pair or a label falls outside the list."""
    names, labels = t.get("cap_list"), t.get("labels")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names) or labels is None:
        return None
    if isinstance(labels, Tensor):
        if labels.dim() != 1 or labels.is_floating_point():
            return None
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, int) and 0 <= x < len(names) for x in labels):
        return None
    return [names[x] for x in labels]


def dump_target(t: Mapping[str, Any], i: int, notes: list[str]) -> dict[str, Any]:
    """One target of the dump (see the module docstring); notes say what was moved or dropped."""
    d: dict[str, Any] = {}
    for k in ("boxes", "phrases", "tokens_positive"):
        if k not in t or t[k] is None:
            continue
        v = t[k]
        if k == "boxes":
            d[k] = torch.as_tensor(v).detach().cpu()
        elif k == "phrases":
            d[k] = [str(p) for p in v]
        else:
            d[k] = [[[int(a), int(b)] for a, b in spans] for spans in v]
    named = phrases_from_labels(t) if "phrases" not in d and "tokens_positive" not in d else None
    if named is not None:
        d["phrases"] = named
        notes.append(f"targets[{i}]: no phrases or tokens_positive; its phrases are cap_list[labels] (the names its "
                     "labels index, as Open-GroundingDino's criterion reads them)")
    pm = user_positive_map(t)
    if pm is not None and "phrases" not in d and "tokens_positive" not in d:
        d["positive_map"] = pm.detach().cpu().float()
        src = "positive_map" if isinstance(t.get("positive_map"), Tensor) else "token_labels"
        notes.append(f"targets[{i}]: no phrases or tokens_positive; its '{src}' is the dump's positive_map")
    extra, dropped = {}, []
    for k, v in t.items():
        if k in SCHEMA_TARGET_KEYS or k == "caption":
            continue
        value = portable(v)
        if value is _DROP:
            dropped.append(f"{k} ({type(v).__name__})")
        else:
            extra[str(k)] = value
    if extra:
        d["extra"] = extra
        notes.append(f"targets[{i}]: the trainer's own keys {', '.join(sorted(extra))} are kept under 'extra'")
    if dropped:
        notes.append(f"targets[{i}]: dropped {', '.join(sorted(dropped))} (not tensors, numbers, strings or lists)")
    return d


def _target_gaps(targets: Any) -> list[str]:
    if not isinstance(targets, Sequence) or isinstance(targets, str):
        return []
    gaps = []
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping):
            gaps.append(f"targets[{i}] is a {type(t).__name__}, not a dict")
            continue
        boxes = t.get("boxes")
        if isinstance(boxes, Tensor):
            n = int(boxes.shape[0]) if boxes.dim() >= 1 else 0
        else:
            n = len(boxes) if hasattr(boxes, "__len__") else 0
        if n and not any(t.get(k) is not None for k in ("phrases", "tokens_positive")) \
                and user_positive_map(t) is None and phrases_from_labels(t) is None:
            gaps.append(f"targets[{i}] has {n} boxes but no phrases, tokens_positive, positive_map, token_labels or "
                        f"labels indexing a cap_list (its keys: {', '.join(sorted(map(str, t)))})")
    return gaps


def replay_gaps(batch: Any, forward: Mapping[str, Any] | None) -> list[str]:
    """What a dump of this step would lack for `nanscope inspect DUMP`; [] when it would replay."""
    fwd = forward or {}
    args, kwargs = fwd.get("args") or (), fwd.get("kwargs") or {}
    hf = batch if batch is not None else (kwargs if "pixel_values" in kwargs else None)
    if _is_hf(hf):  # transformers' form: the dump keeps it as it is (`nanscope.replay.hf_batch`)
        return _hf_gaps(hf, given=batch is not None)
    if batch is None:
        images = args[0] if args else kwargs.get("samples", kwargs.get("images"))
        targets = kwargs.get("targets", args[1] if len(args) > 1 and not isinstance(args[1], str) else None)
        captions = fwd.get("captions") or kwargs.get("captions")
    elif isinstance(batch, Mapping):
        images, targets = batch.get("images"), batch.get("targets")
        captions = batch.get("captions") or fwd.get("captions")
    elif isinstance(batch, Sequence) and len(batch) == 2:
        images, targets, captions = batch[0], batch[1], fwd.get("captions")
    else:
        return [f"the batch is a {type(batch).__name__}; expected a dict or an (images, targets) pair"]
    if captions is None and isinstance(targets, Sequence) and targets and all(
            isinstance(t, Mapping) and isinstance(t.get("caption"), str) for t in targets):
        captions = [t["caption"] for t in targets]
    gaps = []
    if images is None:
        gaps.append("no images: the batch has no 'images' and the model was not called with them")
    if not captions:
        gaps.append("no captions: not in the batch ('captions' or targets' 'caption') nor in the GroundingDINO call")
    return gaps + _target_gaps(targets)


def _is_hf(batch: Any) -> bool:
    from nanscope.replay.hf_batch import is_hf_batch

    return is_hf_batch(batch)


def _hf_gaps(batch: Mapping[str, Any], *, given: bool) -> list[str]:
    """A batch (or model call) in transformers' form: what its structure lacks. No labels in a model call is
    fine (the dump then holds the images without boxes); in a batch given to check() it is a gap."""
    from nanscope.errors import BatchError
    from nanscope.replay.hf_batch import validate_hf_batch

    if not given and batch.get("labels") is None:
        return []
    try:
        validate_hf_batch(batch, source="the batch")
    except BatchError as exc:
        return [str(exc)]
    return []
