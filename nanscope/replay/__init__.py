"""The inspect pipeline: a batch file and a checkpoint become a `Replay`, a forward, and a diagnosis.

`batch` (the schema), `positive_map` (phrases/spans -> tokens, with what truncation cut), `session`
(`prepare` -> `Replay`, through the model's stack), `diagnose` (`inspect`), `module_stats` (NS303).
"""

from nanscope.replay.session import Replay, prepare

__all__ = ["Replay", "prepare"]
