"""A batch file in either form: nanscope's schema (`nanscope.replay.batch`) or the Hugging Face form
(`nanscope.replay.hf_batch`, turned into a `Batch` by the stack once its tokenizer is loaded)."""

from __future__ import annotations

import os
from typing import Union

from nanscope.replay.batch import Batch, check_replayable, read_raw, validate_batch
from nanscope.replay.hf_batch import HfBatch, is_hf_batch, validate_hf_batch


def read_batch(path: str | os.PathLike[str]) -> Union[Batch, HfBatch]:
    """Read (weights_only) and validate a batch file; which form it is decides the type returned."""
    raw = read_raw(path)
    check_replayable(raw, str(path))
    if is_hf_batch(raw):
        return validate_hf_batch(raw, source=str(path))
    return validate_batch(raw, source=str(path))
