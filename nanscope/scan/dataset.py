"""The dataset a scan reads: its format (detected or forced), its label map, and its samples in bounded chunks.

`iter_chunks` yields (index, line, payload) per sample of one shard: raw bytes for ODVG (parsed in the
worker), an image with its annotations for JSON documents. A shard `(i, n)` keeps the samples whose
index is `i mod n`, the same split whatever the worker count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from nanscope.errors import DataError, InputError
from nanscope.scan import coco, odvg
from nanscope.scan.sample import OD

FORMATS = ("coco", "odvg", "grounding", "webdataset", "parquet")
CHUNK = 256  # samples per chunk: one batched tokenizer call, one unit of work for a worker


@dataclass(frozen=True)
class Dataset:
    """What a scan reads: the resolved format and, for OD, the label map."""

    path: str
    format: str  # coco | odvg | grounding
    mode: str  # od | vg
    label_map: Mapping[str, str] | None
    label_map_path: str | None
    total: int | None  # samples (JSON) or lines (JSONL, for the progress bar)
    document: Any = None  # the parsed JSON document (coco / grounding)
    by_image: Any = None
    orphans: int = 0
    files: tuple[str, ...] = ()  # webdataset / parquet: the shards, in order


def detect_format(path: str | os.PathLike[str]) -> str:
    """odvg when the first non-blank line is a JSON object with `filename`; else coco or grounding."""
    import json

    p = Path(path)
    shards = _shard_format(p)
    if shards is not None:
        return shards
    if not p.is_file():
        raise DataError(f"dataset {str(p)!r} does not exist; expected a COCO JSON, an ODVG .jsonl or a grounding JSON")
    for _, raw in odvg.iter_lines(p):
        try:
            first = json.loads(raw)
        except ValueError:
            break
        if isinstance(first, dict) and "filename" in first:
            return "odvg"
        break
    return "odvg" if p.suffix.lower() in (".jsonl", ".odvg") else "json"


def _shard_format(p: Path) -> str | None:
    """webdataset for .tar files (or a folder of them), parquet for .parquet files (or a folder of them)."""
    if p.is_dir():
        if any(p.glob("*.tar")):
            return "webdataset"
        return "parquet" if any(p.glob("*.parquet")) else None
    return {".tar": "webdataset", ".parquet": "parquet"}.get(p.suffix.lower())


def shard_files(path: str | os.PathLike[str], fmt: str) -> tuple[str, ...]:
    """A shard file, or a folder's shards in name order (a folder of img2dataset output holds NNNNN.tar and
    NNNNN.parquet with the same records: the tars are read)."""
    p = Path(path)
    ext = ".tar" if fmt == "webdataset" else ".parquet"
    files = sorted(str(f) for f in p.glob(f"*{ext}")) if p.is_dir() else [str(p)]
    if not files or not all(Path(f).is_file() for f in files):
        raise DataError(f"dataset {str(p)!r} holds no {ext} file; expected a {fmt} shard or a folder of them")
    return tuple(files)


def _first_line_is_grounding(path: Path) -> None:
    """An ODVG file scanned without --label-map is grounding (VG): its first line says at once when it is
    detection (OD) instead, rather than after the tokenizer is loaded."""
    import json

    for line, raw in odvg.iter_lines(path):
        try:
            first = json.loads(raw)
        except ValueError:
            return  # the scan reports a line that is not JSON where it reads it
        if isinstance(first, dict) and "detection" in first and "grounding" not in first:
            raise DataError(f"{str(path)!r} line {line} is a detection (OD) line; pass its label map with --label-map")
        return


def open_dataset(path: str | os.PathLike[str], *, format: str | None = None, label_map: str | None = None) -> Dataset:
    if format is not None and format not in FORMATS:
        raise InputError(f"--format {format!r} is not known; expected one of {', '.join(FORMATS)}")
    fmt = format or detect_format(path)
    if fmt in ("webdataset", "parquet"):
        from nanscope.scan import parquet, wds

        if label_map:
            raise InputError("--label-map is for ODVG detection files; GRIT-style records are grounding data")
        files = shard_files(path, fmt)
        total = sum(wds.count(f) if fmt == "webdataset" else parquet.count(f) for f in files)
        if fmt == "parquet":
            for f in files:
                parquet.columns(f)  # a file without GRIT's columns fails here, naming the file and its columns
        return Dataset(str(path), fmt, "vg", None, None, total, files=files)
    if fmt == "odvg":
        if format is not None and not Path(path).is_file():
            raise DataError(f"dataset {str(path)!r} does not exist")
        lm = odvg.load_label_map(label_map) if label_map else None
        if lm is None:
            _first_line_is_grounding(Path(path))
        return Dataset(str(path), "odvg", OD if lm else "vg", lm, label_map, odvg.count_lines(path))
    doc = coco.load_document(path)
    kind = coco.kind_of(doc) if fmt == "json" else fmt
    if kind == "odvg":
        raise DataError(f"{str(path)!r} is one JSON document, not ODVG JSONL (one object per line)")
    if label_map:
        raise InputError("--label-map is for ODVG detection files; a COCO file carries its label map in `categories`")
    lm = coco.label_map_of(doc, str(path)) if kind == "coco" else None
    by_image, orphans = coco.group(doc, str(path))
    return Dataset(str(path), kind, OD if kind == "coco" else "vg", lm, None, len(doc["images"]), doc, by_image,
                   orphans)


def iter_chunks(ds: Dataset, shard: tuple[int, int], size: int = CHUNK) -> Iterator[list[tuple[int, int | None, Any]]]:
    """Chunks of (index, line, payload) of this shard: raw bytes for ODVG, image + annotations for JSON."""
    i, n = shard
    chunk: list[tuple[int, int | None, Any]] = []
    if ds.format == "odvg":
        items: Iterable[tuple[int, int | None, Any]] = (
            (index, line, raw) for index, (line, raw) in enumerate(odvg.iter_lines(ds.path)))
    elif ds.files:
        from nanscope.scan.units import iter_unit, plan

        items = (item for unit in plan(ds) for item in iter_unit(ds, unit))
    else:
        items = ((index, None, item) for index, item in coco.iter_items(ds.document, ds.by_image))
    for index, line, payload in items:
        if index % n != i:
            continue
        chunk.append((index, line, payload))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
