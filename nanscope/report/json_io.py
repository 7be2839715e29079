"""The result on disk: `RESULT.json` (schema `nanscope.result/1`) and its sidecar `RESULT.json.artifacts.pt`.

The JSON is `Result.to_json()`: sorted keys, no timestamps, byte-identical for the same inputs. The
sidecar holds `Result.artifacts` (the tensors the HTML figures need) written with `torch.save` in a
form `torch.load(..., weights_only=True)` accepts: tensors, str, int, float, bool, None, lists and
str-keyed dicts, byte-identical for the same artifacts. `read_result` loads both back, so `nanscope report` re-renders without the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from nanscope import progress
from nanscope.errors import InputError
from nanscope.result import SCHEMA, Result

SIDECAR_SUFFIX = ".artifacts.pt"
SIDECAR_FORMAT = "nanscope.artifacts/1"


def sidecar_path(json_path: str | os.PathLike[str]) -> Path:
    """`out/r.json` -> `out/r.json.artifacts.pt`."""
    return Path(f"{os.fspath(json_path)}{SIDECAR_SUFFIX}")


@lru_cache(maxsize=1)
def result_schema() -> dict[str, Any]:
    """The JSON Schema of a result file (package data `nanscope/report/result.schema.json`)."""
    text = resources.files("nanscope.report").joinpath("result.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _weights_only_safe(x: Any, key: str) -> Any:
    """Artifacts as plain containers of tensors and scalars; anything else is an internal bug."""
    import torch

    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()  # a view would save its whole storage
    if isinstance(x, Mapping):
        return {str(k): _weights_only_safe(v, f"{key}.{k}") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_weights_only_safe(v, f"{key}[{i}]") for i, v in enumerate(x)]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return x.item()
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy arrays
        return torch.as_tensor(x)
    raise TypeError(f"artifact {key!r} is a {type(x).__name__}; expected tensors, numbers, strings, lists or dicts")


def result_files(result: Result) -> tuple[str, bytes | None]:
    """The JSON text and the sidecar bytes (None without artifacts) of `result`, as `write_result` writes
    them. The JSON's `sidecar` field records the sidecar's SHA-256 and size (null: no sidecar). torch is imported
    only for a sidecar: a scan's JSON needs none (importing it cost a 10-sample scan ~450 MiB)."""
    blob = None
    if result.artifacts:
        import torch

        payload = {"format": SIDECAR_FORMAT, "artifacts": _weights_only_safe(dict(result.artifacts), "artifacts")}
        buf = io.BytesIO()  # torch.save names the zip records after a file's name: bytes stay path-free
        torch.save(payload, buf)
        blob = buf.getvalue()
    d = result.to_dict()
    d["sidecar"] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)} if blob else None
    return json.dumps(d, indent=2, sort_keys=True) + "\n", blob


@progress.staged("writing the JSON result", "wrote the JSON result")
def write_result(result: Result, path: str | os.PathLike[str]) -> Path | None:
    """Write `path` (the JSON) and, when the result has artifacts, the sidecar, as one unit (temporary
    files, then both renames under a lock on the folder); return the sidecar path. `read_result` checks
    the recorded hash. A stale sidecar from an earlier run is removed when this result has none.
    """
    from nanscope.safe_io import write_pair

    p = Path(path)
    side = sidecar_path(p)
    text, blob = result_files(result)
    write_pair(p, text.encode("utf-8"), side, blob)
    return side if blob else None


def validate_result_dict(d: Any, *, source: str = "result") -> None:
    """Raise InputError naming `source` and the field when `d` is not a `nanscope.result/1` result.

    The schema version is always checked; the full JSON Schema too when `jsonschema` is installed.
    """
    if not isinstance(d, dict):
        raise InputError(f"{source!r} holds a JSON {type(d).__name__}; expected an object with schema {SCHEMA!r}")
    if d.get("schema") != SCHEMA:
        raise InputError(f"{source!r} has schema {d.get('schema')!r}; expected {SCHEMA!r} (a nanscope --json result)")
    try:
        import jsonschema
    except ImportError:
        missing = [k for k in result_schema()["required"] if k not in d]
        if missing:
            raise InputError(f"{source!r} lacks field(s) {', '.join(missing)} required by {SCHEMA!r}") from None
        return
    errors = sorted(jsonschema.Draft202012Validator(result_schema()).iter_errors(d), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        field = "/".join(str(x) for x in e.path) or "(top level)"
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InputError(f"{source!r} field {field}: {e.message}{more}")


MAX_JSON_DEPTH = 64  # a result nests about 6 levels; deeper input is refused before it reaches a recursion


def _json_depth(text: str) -> int:
    """The deepest bracket nesting of JSON `text`, outside strings (a cheap scan, no recursion)."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def read_result(path: str | os.PathLike[str], *, artifacts: bool = True) -> Result:
    """Load a result JSON (validated) and, when present, its sidecar artifacts (hash checked)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{str(p)!r} does not exist; expected a result JSON written with --json") from None
    except IsADirectoryError:
        raise InputError(f"{str(p)!r} is a folder; expected a result JSON written with --json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{str(p)!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InputError(f"{str(p)!r} nests {depth} levels deep; a nanscope result nests at most {MAX_JSON_DEPTH} "
                         "(not a result JSON written with --json)")
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{str(p)!r} is not valid JSON: {exc}") from None
    record = d.pop("sidecar", "legacy") if isinstance(d, dict) else "legacy"
    validate_result_dict(d, source=str(p))
    result = Result.from_dict(d)
    if artifacts:
        side = sidecar_path(p)
        if record == "legacy":  # written before the JSON recorded its sidecar
            result.artifacts = read_artifacts(side)
        elif record is not None:
            _check_sidecar(p, side, record)
            result.artifacts = read_artifacts(side)
    return result


def _check_sidecar(json_path: Path, side: Path, record: Any) -> None:
    """The sidecar must be the one written with this JSON (its SHA-256), not a torn or foreign pair."""
    want = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(want, str):
        raise InputError(f"{str(json_path)!r} field sidecar is {record!r}; expected {{sha256, bytes}} or null")
    try:
        got = hashlib.sha256(side.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise InputError(f"{str(json_path)!r} records a sidecar {str(side)!r} that does not exist; copy the "
                         "JSON with its .artifacts.pt or rerun with --json") from None
    except OSError as exc:
        raise InputError(f"sidecar {str(side)!r} cannot be read: {exc.strerror or exc}") from None
    if got != want:
        raise InputError(f"sidecar {str(side)!r} does not match {str(json_path)!r} (SHA-256 {got[:12]}..., the "
                         f"JSON records {want[:12]}...): the pair was torn by an interrupted or concurrent run, "
                         "or the files come from two runs; rerun with --json")


def read_artifacts(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar's artifacts ({} when the file does not exist). Never unpickles code."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        return {}
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise InputError(f"sidecar {str(p)!r} cannot be loaded with weights_only=True: {exc}") from None
    from nanscope.load_bounds import check_loaded

    check_loaded(payload, f"sidecar {str(p)!r}")
    if not isinstance(payload, dict) or payload.get("format") != SIDECAR_FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise InputError(f"sidecar {str(p)!r} has format {got!r}; expected {SIDECAR_FORMAT!r}")
    return dict(payload.get("artifacts") or {})
