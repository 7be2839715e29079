"""Units of work for a distributed scan: JSONL files split into newline-aligned byte ranges that carry their first
line number and first sample index (so sample ids and line numbers stay exact), one unit per webdataset tar or
parquet file, one for a JSON document. `iter_unit` yields a unit's (index, line, payload) items exactly as
`dataset.iter_chunks` yields them for the whole dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


UNIT_BYTES = 32 << 20  # JSONL bytes per unit: a few seconds of one worker's time, a few MiB of results


@dataclass(frozen=True)
class Unit:
    number: int
    kind: str  # lines | tar | parquet | document
    path: str
    first_index: int = 0  # dataset index of the unit's first sample
    samples: int = 0
    start: int = 0  # lines: byte range [start, end)
    end: int = 0
    first_line: int = 1  # lines: 1-based line number at `start`
    lines: int = 0  # lines: physical lines in the range (blank ones included)

    @property
    def label(self) -> str:
        name = Path(self.path).name
        if self.kind == "lines":
            last = self.first_line + max(self.lines - 1, 0)
            return f"{name} bytes {self.start}-{self.end} (lines {self.first_line}-{last})"
        return name


def _line_ranges(path: str, unit_bytes: int) -> list[tuple[int, int, int, int, int]]:
    """(start, end, first line, first index, lines, samples) per range: one pass over the file at disk speed."""
    out = []
    line, index, start = 1, 0, 0
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while start < size:
            f.seek(start)
            data = f.read(unit_bytes)
            cut = data.rfind(b"\n")
            if len(data) == unit_bytes and start + len(data) < size:
                if cut < 0:  # one line longer than a unit: a unit of its own, found without holding it
                    length, blank = _line_end(f, data, unit_bytes)
                    out.append((start, start + length, line, index, 1, 0 if blank else 1))
                    start += length
                    line += 1
                    index += not blank
                    continue
                data = data[:cut + 1]
            lines = data.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            samples = sum(1 for ln in lines if ln.strip())
            out.append((start, start + len(data), line, index, len(lines), samples))
            start += len(data)
            line += len(lines)
            index += samples
    return out


def _line_end(f: Any, head: bytes, block: int) -> tuple[int, bool]:
    """(bytes up to and including the newline that ends the line `head` starts, whether it is blank), read on from
    `f` one block at a time: memory stays at one block however long the line (its worker refuses it past
    `odvg.MAX_LINE`, naming it)."""
    length, blank = len(head), not head.strip()
    while more := f.read(block):
        nl = more.find(b"\n")
        part = more if nl < 0 else more[:nl + 1]
        length += len(part)
        blank = blank and not part.strip()
        if nl >= 0:
            break
    return length, blank


def plan(ds: Any, *, unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """The units of a dataset, in dataset order."""
    from nanscope.scan import parquet, wds

    units: list[Unit] = []
    if ds.format == "odvg":
        for k, (s, e, ln, ix, nl, ns) in enumerate(_line_ranges(ds.path, unit_bytes)):
            units.append(Unit(k, "lines", ds.path, ix, ns, s, e, ln, nl))
        return units
    if ds.format in ("webdataset", "parquet"):
        index = 0
        for k, f in enumerate(ds.files):
            n = wds.count(f) if ds.format == "webdataset" else parquet.count(f)
            units.append(Unit(k, "tar" if ds.format == "webdataset" else "parquet", f, index, n))
            index += n
        return units
    return [Unit(0, "document", ds.path, 0, ds.total or 0)]


def iter_unit(ds: Any, unit: Unit) -> Iterator[tuple[int, int | None, Any]]:
    from nanscope.scan import coco, odvg, parquet, wds

    index = unit.first_index
    if unit.kind == "lines":  # line by line, each bounded as in a single-process scan (odvg.MAX_LINE)
        for n, raw in odvg.iter_lines(unit.path, start=unit.start, end=unit.end, first_line=unit.first_line):
            yield index, n, raw
            index += 1
    elif unit.kind == "tar":
        for key, file, rec, image in wds.iter_samples(unit.path):
            yield index, None, {"key": key, "file": file, "record": rec, "image": image, "source": unit.path}
            index += 1
    elif unit.kind == "parquet":
        for key, file, rec in parquet.iter_rows(unit.path):
            yield index, None, {"key": key, "file": file, "record": rec, "image": None, "source": unit.path}
            index += 1
    else:
        yield from ((i, None, item) for i, item in coco.iter_items(ds.document, ds.by_image))
