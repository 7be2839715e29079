"""Reading groundingdino configs without running what they contain.

groundingdino's own `SLConfig.fromfile` executes a `.py` config, reads YAML with PyYAML's full
loader (`!!python/object/apply:os.system [...]` runs) and follows `_base_` from a JSON config to a
`.py` that it executes. nanscope reads JSON with `json`, YAML with `yaml.safe_load`, merges `_base_`
files the way SLConfig does, and runs a `.py` (the config itself or a base) only when `trust_py`:
the user named the file (`--config`, `config=`) or passed `--trust-config`. A watch dump never names
a file to run: it records the resolved values (`ConfigValues`), which are plain JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanscope.errors import ConfigError

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"
SUFFIXES = (".py", ".json", ".yml", ".yaml")
MAX_BASE_DEPTH = 16  # `_base_` chains deeper than this are a loop
MAX_BASE_FILES = 64  # files one config's `_base_` graph may read in all (groundingdino's configs read 1-3)
MAX_CONFIG_BYTES = 4 << 20  # a config file larger than this is not a model config
MAX_CONFIG_VALUES = 100_000  # values of a YAML config once its aliases are expanded (a billion-laughs bomb: 1e9)


@dataclass(frozen=True)
class ConfigValues:
    """A config as resolved values (a dump's `config_values`): nothing to read from disk, nothing to run."""

    values: Mapping[str, Any]
    source: str = "config values"  # shown in reports: where the values came from
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return self.source


def py_refused(path: Path, why: str) -> ConfigError:
    return ConfigError(f"config {str(path)!r} is a .py file, which runs Python code when read, and {why}; "
                       "nanscope only runs a .py config you name yourself: pass it with --config PATH, or add "
                       "--trust-config if you trust this file")


def read_values(path: str | os.PathLike[str], *, trust_py: bool, _depth: int = 0,
                _reads: list[str] | None = None) -> dict[str, Any]:
    """The config's values with every `_base_` merged in (child values win, `_delete_` drops the base's).
    A `_base_` graph may read at most MAX_BASE_FILES files in all (a fan-out of repeated bases is refused)."""
    p = Path(path)
    reads = [] if _reads is None else _reads
    reads.append(str(p))
    if len(reads) > MAX_BASE_FILES:
        raise ConfigError(f"config {reads[0]!r}: its `_base_` files reach more than {MAX_BASE_FILES} files in all "
                          f"(the last: {str(p)!r}, read {reads.count(str(p))} times); expected a few base files")
    if _depth > MAX_BASE_DEPTH:
        raise ConfigError(f"config {str(p)!r}: `_base_` files nest deeper than {MAX_BASE_DEPTH}; is there a loop?")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; expected a groundingdino config (.py or .json)")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"config file {str(p)!r} has suffix {p.suffix!r}; expected .py, .json or .yaml")
    if suffix == ".py":
        if not trust_py:
            raise py_refused(p, "it was not given on the command line" if _depth == 0
                             else "a `_base_` of a JSON/YAML config names it")
        data = _run_py(p)
    else:
        data = _read_data(p)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    merged: dict[str, Any] = {}
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str):
            raise ConfigError(f"config {str(p)!r}: `_base_` holds a {type(base).__name__}; expected file names")
        values = read_values(p.parent / base, trust_py=trust_py, _depth=_depth + 1, _reads=reads)
        dup = sorted(merged.keys() & values.keys())
        if dup:
            raise ConfigError(f"config {str(p)!r}: its `_base_` files both set {', '.join(dup[:5])}")
        merged.update(values)
    return _merge(data, merged)


def _read_data(p: Path) -> dict[str, Any]:
    import yaml

    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(p)!r} is {size} bytes; a model config is at most {MAX_CONFIG_BYTES}")
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() != ".json":
            _check_yaml_size(p, text)
        # yaml's safe loader: a `!!python/...` tag is an error, never a call
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(p)!r} could not be read: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} holds a {type(data).__name__}; expected a mapping of names")
    return data


def _check_yaml_size(p: Path, text: str) -> None:
    """Refuse a YAML whose aliases expand past MAX_CONFIG_VALUES values, counted on the node graph
    (each node once: memory stays that of the file) before anything is built from it."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # safe_load reports it, naming the line
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: Any) -> int:
        stack = [(node, False)]
        while stack:
            n, done = stack.pop()
            if id(n) in sizes:
                continue
            if not done and id(n) in visiting:  # a recursive alias: no finite expansion
                sizes[id(n)] = MAX_CONFIG_VALUES + 1
                continue
            visiting.add(id(n))
            kids = ([c for kv in n.value for c in kv] if isinstance(n, yaml.MappingNode)
                    else list(n.value) if isinstance(n, yaml.SequenceNode) else [])
            if done:
                sizes[id(n)] = min(1 + sum(sizes[id(c)] for c in kids), MAX_CONFIG_VALUES + 1)
            else:
                stack.append((n, True))
                stack.extend((c, False) for c in kids if id(c) not in sizes)
        return sizes[id(node)]

    if root is not None and size(root) > MAX_CONFIG_VALUES:
        raise ConfigError(f"config file {str(p)!r}: its YAML aliases (*name) expand to more than {MAX_CONFIG_VALUES} "
                          "values (an alias bomb); a model config holds a few hundred")


def _run_py(p: Path) -> dict[str, Any]:
    """A trusted .py config, read by groundingdino's own SLConfig (its `_base_` files included)."""
    import contextlib
    import io

    from groundingdino.util.slconfig import SLConfig

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cfg = SLConfig.fromfile(str(p))
    except Exception as exc:  # noqa: BLE001 (groundingdino raises many kinds here)
        raise ConfigError(f"config file {str(p)!r} could not be read: {exc}") from None
    return cfg._cfg_dict.to_dict()


def _merge(child: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """SLConfig's `_merge_a_into_b`: nested dicts merge, other values of the child replace the base's."""
    out = dict(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get(DELETE_KEY, False):
            out[k] = _merge(v, out[k])
        else:
            out[k] = {a: b for a, b in v.items() if a != DELETE_KEY} if isinstance(v, dict) else v
    return out


def jsonable(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Values that survive JSON (tuples become lists); names of those dropped (modules, functions, ...).
    A dropped top-level name is left out; a dropped entry inside a list or dict becomes None."""
    dropped: list[str] = []
    data = (type(None), bool, int, float, str, list, tuple, Mapping)

    def conv(v: Any, name: str) -> Any:
        if isinstance(v, (list, tuple)):
            return [conv(x, f"{name}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, Mapping):
            return {str(k): conv(x, f"{name}.{k}") for k, x in v.items()}
        if isinstance(v, data):
            return v
        dropped.append(name)
        return None

    out: dict[str, Any] = {}
    for k, v in values.items():
        if str(k).startswith("__"):
            continue
        if not isinstance(v, data):
            dropped.append(str(k))
            continue
        out[str(k)] = conv(v, str(k))
    return out, dropped


def dump_config(meta: Mapping[str, Any], folder: str, *, trust_py: bool) -> ConfigValues | str | None:
    """The config a watch dump's manifest gives: its recorded values; for an older dump that only names a
    file, that file read as data (a `.py` only with `trust_py`, i.e. --trust-config). Never runs code
    the dump chose."""
    values, named = meta.get("config_values"), meta.get("config")
    if isinstance(values, dict):
        origin = f" (from {named})" if isinstance(named, str) else ""
        return ConfigValues(values, source=f"config values recorded in {folder}/manifest.json{origin}")
    if values is not None:
        raise ConfigError(f"{folder}/manifest.json: config_values is a {type(values).__name__}; expected a mapping")
    if not named:
        return None
    if not isinstance(named, str):
        raise ConfigError(f"{folder}/manifest.json: config is a {type(named).__name__}; expected a file name")
    if trust_py:
        return named
    p = Path(named)
    if p.suffix.lower() == ".py":
        raise ConfigError(f"dump {folder!r} names config {named!r}, a .py file, and records no config values "
                          "(it was written by an older nanscope); a config named by a dump is never run. If you "
                          f"trust that file, pass it yourself: --config {named} (or add --trust-config)")
    try:
        data = read_values(p, trust_py=False)
    except ConfigError as exc:
        raise ConfigError(f"dump {folder!r} names config {named!r}, which nanscope reads as data only: {exc}") from None
    return ConfigValues(data, source=f"config {named} named by the dump (read as data)")
