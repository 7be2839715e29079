"""webdataset tar shards as img2dataset writes them (GRIT-20M's download): `KEY.jpg` + `KEY.json` (+ `KEY.txt`)
per sample, members of one sample next to each other, the key being the member name up to its first dot.

Read as a stream (`tarfile` mode `r|*`), so memory stays flat; each image member's header is read with
PIL for its real size (NS209 against the JSON's width/height) and a sample without one is NS208. A
truncated or corrupt shard is a `DataError` naming the shard and the last key read.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator

from nanscope.errors import DataError

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _key_ext(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    stem, dot, ext = base.partition(".")
    folder = os.path.dirname(name)
    return (f"{folder}/{stem}" if folder else stem), ("." + ext.lower() if dot else "")


def _image_size(data: bytes) -> tuple[int, int] | str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return f"unreadable: {str(exc)[:120]}"


def iter_samples(path: str | os.PathLike[str]) -> Iterator[tuple[str, str, Any, Any]]:
    """(key, image member name, parsed JSON record, image size or why there is none) per sample with a .json."""
    import json

    name = Path(path).name
    key: str | None = None
    members: dict[str, bytes] = {}
    names: dict[str, str] = {}

    def flush() -> Iterator[tuple[str, str, Any, Any]]:
        if key is None or ".json" not in members:
            return
        try:
            rec = json.loads(members[".json"])
        except ValueError as exc:
            raise DataError(f"shard {name!r} member {key}.json is not valid JSON ({exc}); expected one object per "
                            "sample") from None
        img = next((e for e in IMAGE_EXT if e in members), None)
        image = _image_size(members[img]) if img else "no image member in the shard"
        yield key, f"{name}/{names.get(img or '', key)}", rec, image

    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = _key_ext(m.name)
                if k != key:
                    yield from flush()
                    key, members, names = k, {}, {}
                f = tar.extractfile(m)
                members[ext] = f.read() if f is not None else b""
                names[ext] = os.path.basename(m.name)
            yield from flush()
            end = tar.offset
        if str(path).lower().endswith(".tar") and not _ends_archive(path, end):
            raise tarfile.ReadError("it ends without the two zero blocks that close a tar archive: truncated")
    except (tarfile.TarError, EOFError, OSError) as exc:
        last = f" after key {key!r}" if key is not None else ""
        raise DataError(f"shard {str(path)!r} cannot be read{last} ({exc}); expected a complete webdataset tar "
                        "(re-download or re-create it)") from None


def _ends_archive(path: str | os.PathLike[str], offset: int) -> bool:
    """An uncompressed tar ends with two 512-byte zero blocks after its last member; `tarfile` stops quietly at a
    cut that falls between members, so the scan checks that they are there."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(1024) == bytes(1024)


def count(path: str | os.PathLike[str]) -> int:
    """Samples (keys with a .json) in a shard, from the member headers; a damaged shard counts what it can (its
    scan then fails naming it)."""
    keys = set()
    try:
        with tarfile.open(path, "r:*") as tar:  # headers only: the reader seeks past the members' data
            for m in tar:
                k, ext = _key_ext(m.name)
                if ext == ".json":
                    keys.add(k)
    except (tarfile.TarError, EOFError, OSError):
        pass
    return len(keys)
