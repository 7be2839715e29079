"""Planted GRIT-style data for the scan tests: webdataset shards written with webdataset's own TarWriter, parquet
files with pyarrow, and an ODVG file whose lines all have one byte length (so unit boundaries are known)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

CAPTION = "a cat on a mat"  # "a cat" = [0, 5), "a mat" = [9, 14)


def record(**kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"caption": CAPTION, "width": 64, "height": 48,
                         "noun_chunks": [[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9], [9, 14, 0.2, 0.6, 0.9, 0.95, 0.8]],
                         "ref_exps": [[0, 14, 0.1, 0.1, 0.9, 0.95, 0.7]]}
    r.update(kw)
    return r


# planted per sample number: (code, the record change, the image size written)
BUGS = {
    1: ("NS201", {"noun_chunks": [[0, 5, 0.5, 0.5, 0.1, 0.1, 0.9]]}, (64, 48)),  # x2 < x1
    4: ("NS209", {}, (48, 64)),  # the image is rotated
    6: ("NS103", {"ref_exps": [[30, 40, 0.1, 0.1, 0.5, 0.5, 0.9]]}, (64, 48)),  # span past the caption
}


def png(w: int, h: int) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (w, h)).save(b, "PNG")
    return b.getvalue()


def write_shard(path: Path, first: int, n: int, *, image: bool = True) -> list[str]:
    """Samples first .. first+n-1 with the planted bugs of BUGS; returns their keys."""
    import webdataset as wds

    keys = []
    with wds.TarWriter(str(path)) as sink:
        for i in range(first, first + n):
            code, change, size = BUGS.get(i, (None, {}, (64, 48)))
            key = f"{i:09d}"
            sample: dict[str, Any] = {"__key__": key, "json": json.dumps(record(**change)).encode()}
            if image:
                sample["png"] = png(*size)
            sink.write(sample)
            keys.append(key)
    return keys


def write_parquet(path: Path, first: int, n: int, **columns_dropped: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(first, first + n):
        _, change, _ = BUGS.get(i, (None, {}, None))
        rows.append({"key": f"{i:09d}", **record(**change)})
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.drop([c for c, drop in columns_dropped.items() if drop]), str(path))


def odvg_line(i: int, *, bad: bool, width: int = 0) -> str:
    """A VG line of fixed length: a zero-width box when `bad` (NS201)."""
    x2 = "10.0" if bad else "30.0"
    d = {"filename": f"{i:06d}.jpg", "height": 100, "width": 100,
         "grounding": {"caption": "a cat", "regions": [{"bbox": [10.0, 10.0, float(x2), 20.0], "phrase": "a cat",
                                                        "tokens_positive": [[0, 5]]}]}}
    return json.dumps(d)
