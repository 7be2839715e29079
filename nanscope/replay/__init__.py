"""The inspect pipeline: a batch file and a checkpoint become a `Replay`, a forward, and a diagnosis.

`batch` (the schema), `positive_map` (phrases/spans -> tokens, with what truncation cut), `session`
(`prepare` -> `Replay`, through the model's stack), `diagnose` (`inspect`), `module_stats` (NS303).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Replay", "prepare"]


def __getattr__(name: str) -> Any:
    """`Replay` and `prepare` load torch and the stacks: imported on first use, so that the light modules of
    this package (`positive_map`, used by `nanscope scan` workers) import without them."""
    if name in __all__:
        from nanscope.replay import session

        return getattr(session, name)
    raise AttributeError(f"module 'nanscope.replay' has no attribute {name!r}")
