"""MMEngine checkpoints under `weights_only`: the pickled records they carry, read as plain data.

MMEngine's `Runner.save_checkpoint` writes `{'meta', 'state_dict', 'message_hub', 'optimizer',
'param_schedulers'}`. Besides tensors and containers its pickle names these globals (mmengine 0.10.7,
numpy 2.x; read with `torch.serialization.get_unsafe_globals_in_checkpoint` on a real checkpoint):

| global | where | how it is pickled | read here as |
|---|---|---|---|
| `mmengine.logging.history_buffer.HistoryBuffer` | `message_hub.log_scalars` | NEWOBJ + BUILD(`__dict__`) | `HistoryBufferRecord` (attributes only) |
| `builtins.getattr` | `HistoryBuffer._statistics_methods` | `getattr(HistoryBuffer, 'min')` | the string `'HistoryBuffer.min'` |
| `mmengine.config.config.ConfigDict` | `meta`, `param_schedulers` | `ConfigDict(dict)` | the plain dict |
| `numpy._core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`, `numpy._core.multiarray.scalar` | log scalars, `meta['seed']` | numpy's own pickle | numpy arrays and scalars |

Nothing from mmengine is imported or run: the two mmengine names resolve to the records below, `getattr`
resolves to a function that answers only for `HistoryBufferRecord` (any other `getattr` in a file is refused,
naming it), and numpy's functions only rebuild arrays (numpy 1.x names `numpy.core.multiarray` the same way).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any, Callable

HISTORY_BUFFER = "mmengine.logging.history_buffer.HistoryBuffer"
CONFIG_DICT = "mmengine.config.config.ConfigDict"
# entries of an MMEngine checkpoint that nanscope does not use (said in NS306's notes when present)
TRAINING_ENTRIES = ("meta", "message_hub", "optimizer", "param_schedulers")


class HistoryBufferRecord:
    """The attributes of a pickled `HistoryBuffer` (`max_length`, `_log_history`, `_count_history`, ...);
    no methods run, nothing of mmengine is imported."""

    def __repr__(self) -> str:
        return f"HistoryBufferRecord({sorted(vars(self))})"


def config_dict_record(data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`ConfigDict(dict)` as pickled by MMEngine -> the plain dict it wraps."""
    return dict(data or {})


def record_getattr(obj: Any, name: str) -> str:
    """`getattr(HistoryBuffer, 'min')` in a pickle -> the string 'HistoryBuffer.min'; nothing else is allowed."""
    if obj is HistoryBufferRecord and isinstance(name, str):
        return f"HistoryBuffer.{name}"
    raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) in the pickle: only getattr(HistoryBuffer, name), as "
                                 "MMEngine's message_hub pickles its statistics methods, is read")


def _numpy_globals() -> list[tuple[Callable[..., Any], str]]:
    try:
        import numpy as np
        try:
            from numpy._core.multiarray import _reconstruct, scalar  # numpy 2
        except ImportError:
            from numpy.core.multiarray import _reconstruct, scalar  # numpy 1
    except ImportError:  # no numpy: a file holding numpy objects is refused, naming them
        return []
    out: list[tuple[Callable[..., Any], str]] = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        out += [(_reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    return out


def _dtype_classes() -> list[tuple[Callable[..., Any], str]]:
    """numpy 2's per-dtype classes (`numpy.dtypes.Float64DType`), which a dtype may pickle by name."""
    try:
        import numpy as np
    except ImportError:
        return []
    return [(cls, f"numpy.dtypes.{cls.__name__}") for cls in vars(np.dtypes).values()
            if isinstance(cls, type) and issubclass(cls, np.dtype)]


def mmengine_safe_globals() -> list[tuple[Callable[..., Any], str]]:
    """(object, full name) pairs for `torch.serialization.safe_globals`."""
    return [(HistoryBufferRecord, HISTORY_BUFFER), (config_dict_record, CONFIG_DICT),
            (record_getattr, "builtins.getattr")] + _numpy_globals() + _dtype_classes()


def safe_global_names() -> set[str]:
    return {name for _, name in mmengine_safe_globals()}


def skipped_entries(obj: Any) -> list[str]:
    """The entries of a checkpoint besides its weights that nanscope read and left aside, with what they hold."""
    if not isinstance(obj, Mapping):
        return []
    out = []
    for key, value in obj.items():
        if key in ("state_dict", "model", "model_state_dict"):
            continue
        kind = type(value).__name__
        if isinstance(value, Mapping) and any(isinstance(v, HistoryBufferRecord) for v in _values(value)):
            kind += " of HistoryBuffer records"
        out.append(f"{key} ({kind})")
    return out


def _values(m: Mapping[str, Any], depth: int = 2) -> list[Any]:
    vals = list(m.values())
    if depth > 0:
        for v in list(vals):
            if isinstance(v, Mapping):
                vals += _values(v, depth - 1)
    return vals
