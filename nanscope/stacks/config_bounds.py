"""Model dimensions checked before anything is built: a config with `hidden_dim=1e9` is refused up front.

groundingdino builds whatever its config says; `hidden_dim=1e9`, `num_queries=1e9` or `max_text_len=1e7`
end in an allocation failure or a shape error deep inside torch. `check_model_dims(values, source)`
checks each dimension against a bound far above any published GroundingDINO (SwinT/SwinB: hidden_dim
256, 900 queries, max_text_len 256, 6+6 layers) and the model's rough size (weights plus the per-image
decoder logits) against the machine's available memory, and raises ConfigError naming the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from nanscope.errors import ConfigError

# field -> (smallest, largest) allowed; published models use the first number of each comment
BOUNDS: dict[str, tuple[int, int]] = {
    "hidden_dim": (1, 8192),  # 256
    "num_queries": (1, 100_000),  # 900
    "max_text_len": (1, 8192),  # 256
    "nheads": (1, 256),  # 8
    "enc_layers": (0, 128),  # 6
    "dec_layers": (1, 128),  # 6
    "dim_feedforward": (1, 65_536),  # 2048
    "num_feature_levels": (1, 16),  # 4
    "enc_n_points": (1, 64),  # 4
    "dec_n_points": (1, 64),  # 4
}
DEFAULTS = {"hidden_dim": 256, "num_queries": 900, "max_text_len": 256, "nheads": 8, "enc_layers": 6,
            "dec_layers": 6, "dim_feedforward": 2048}


def available_memory() -> int | None:
    """Bytes of memory the machine can still give (MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def model_bytes(d: Mapping[str, int]) -> dict[str, int]:
    """Rough float32 bytes of the largest parts (a lower bound, good enough to refuse 1e9-sized configs):
    encoder/decoder/fusion weights, and one image's decoder logits [layers, queries, max_text_len]."""
    h, ffn = d["hidden_dim"], d["dim_feedforward"]
    layers = d["enc_layers"] * 3 + d["dec_layers"]  # each encoder layer also has a text layer and a fusion layer
    return {"hidden_dim": 4 * layers * (4 * h * h + 2 * h * ffn),
            "num_queries": 4 * d["dec_layers"] * d["num_queries"] * (d["max_text_len"] + h)}


def check_model_dims(values: Mapping[str, Any], source: str, *, memory: int | None = None) -> None:
    """Raise ConfigError naming `source` and the field when a dimension is not a positive int in its bound,
    or the model would not fit in `memory` bytes (default: what the machine has available now)."""
    dims: dict[str, int] = dict(DEFAULTS)
    for name, (lo, hi) in BOUNDS.items():
        if name not in values:
            continue
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise ConfigError(f"{source}: {name} is {v!r} ({type(v).__name__}); expected an integer in [{lo}, {hi}]")
        if not lo <= v <= hi:
            raise ConfigError(f"{source}: {name} is {v}; expected an integer in [{lo}, {hi}] (groundingdino's "
                              f"published models use {DEFAULTS.get(name, lo)}): nanscope refuses to build a model "
                              "this size")
        dims[name] = v
    if dims["hidden_dim"] % dims["nheads"]:
        raise ConfigError(f"{source}: hidden_dim {dims['hidden_dim']} is not a multiple of nheads {dims['nheads']}")
    have = available_memory() if memory is None else memory
    if have is None:
        return
    parts = model_bytes(dims)
    if sum(parts.values()) > have:
        worst = max(parts, key=parts.__getitem__)
        raise ConfigError(f"{source}: a model with {worst}={dims[worst]} needs at least {sum(parts.values()) / 2**30:.1f} "
                          f"GiB, more than the {have / 2**30:.1f} GiB this machine has available; expected a config "
                          "that fits (check hidden_dim, num_queries, max_text_len, dim_feedforward, the layer counts)")
