"""Parquet annotation files with GRIT's columns (`coyo_N_snappy.parquet`, img2dataset's `NNNNN.parquet`): one row
per sample with `caption`, `width`, `height` and `noun_chunks` and/or `ref_exps` (see `grit.py`); the sample
id is the `key` column (img2dataset), else `id` (GRIT), else the row number. Read in record batches of the
scan's chunk size with pyarrow, only the columns the scan needs, so memory stays flat.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from nanscope.errors import DataError
from nanscope.scan.grit import SPAN_FIELDS

REQUIRED = ("caption", "width", "height")
KEYS = ("key", "id")
BATCH = 1024  # rows per record batch


def _open(path: str | os.PathLike[str]) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(path))
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(f"parquet file {str(path)!r} cannot be read ({exc}); expected a complete parquet file") from None


def columns(path: str | os.PathLike[str]) -> list[str]:
    """The columns to read; a file without the required ones is a `DataError` listing what it has."""
    pf = _open(path)
    have = list(pf.schema_arrow.names)
    missing = [c for c in REQUIRED if c not in have]
    spans = [c for c in SPAN_FIELDS if c in have]
    if missing or not spans:
        need = missing + ([] if spans else ["noun_chunks or ref_exps"])
        raise DataError(f"parquet file {str(path)!r} has no column {', '.join(need)}; it has {', '.join(have[:20])}; "
                        "expected GRIT's columns caption, width, height, noun_chunks / ref_exps")
    key = next((k for k in KEYS if k in have), None)
    return list(REQUIRED) + spans + ([key] if key else [])


def iter_rows(path: str | os.PathLike[str]) -> Iterator[tuple[Any, str, dict[str, Any]]]:
    """(sample id, 'file:row', record) per row."""
    cols = columns(path)
    key = cols[-1] if cols[-1] in KEYS else None
    name = Path(path).name
    row = 0
    try:
        for batch in _open(path).iter_batches(batch_size=BATCH, columns=cols):
            for rec in batch.to_pylist():
                yield (rec[key] if key else row), f"{name}:{row}", rec
                row += 1
    except (OSError, ValueError) as exc:
        raise DataError(f"parquet file {str(path)!r} cannot be read after row {row} ({exc})") from None


def count(path: str | os.PathLike[str]) -> int:
    return int(_open(path).metadata.num_rows)
