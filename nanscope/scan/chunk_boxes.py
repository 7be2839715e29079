"""A chunk's boxes as one array: which samples need the per-box checks, and the box-size histogram.

Most boxes of a real dataset are fine. Instead of walking every box in Python, the chunk's boxes go into
one [N, 4] float64 array (pixel x1, y1, x2, y2) and numpy finds the samples with a box that is not
finite, not at least 1 px wide and high, or not wholly inside its image (or whose image has no size):
only those samples, the ones without boxes and the ones that repeat a (name, box) pair go through
`checks.box_hits`, which reports them one box at a time. A box wholly inside its image, finite and at
least 1x1 px passes every box check, so the filter never hides a hit.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Sequence

SIZE_BINS = 15  # sqrt(box area) in px: < 1, [1, 2), [2, 4) ... [4096, 8192), >= 8192 (engine.Stats.size_hist)


def box_array(samples: Sequence[Any]) -> tuple[Any, Any, list[int]]:
    """`(boxes [N, 4] float64, owner [N] sample position, boxes per sample)`."""
    import numpy as np

    counts = [len(s.boxes) for s in samples]
    coords = chain.from_iterable(chain.from_iterable(s.boxes for s in samples))
    boxes = np.fromiter(coords, dtype=np.float64, count=4 * sum(counts)).reshape(-1, 4)
    owner = np.repeat(np.arange(len(samples)), counts)
    return boxes, owner, counts


def needs_box_checks(samples: Sequence[Any], boxes: Any, owner: Any, counts: list[int]) -> list[bool]:
    """Per sample: whether `checks.box_hits` can find anything (see the module docstring)."""
    import numpy as np

    n = len(samples)
    size = np.array([(s.width if s.width is not None else np.nan, s.height if s.height is not None else np.nan)
                     for s in samples], dtype=np.float64).reshape(-1, 2)[owner]  # [N, 2]
    with np.errstate(invalid="ignore", over="ignore"):
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        good = (np.isfinite(boxes).all(axis=1) & (w >= 1.0) & (h >= 1.0) & (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0)
                & (boxes[:, 2] <= size[:, 0]) & (boxes[:, 3] <= size[:, 1]))  # NaN sizes compare False
    need = (np.bincount(owner[~good], minlength=n) > 0) | (np.array(counts, dtype=np.int64) == 0)
    need[_repeated(samples, boxes, owner)] = True
    return need.tolist()


def _repeated(samples: Sequence[Any], boxes: Any, owner: Any) -> Any:
    """Owners of a (name, box) pair that repeats within a sample (NS205), found by one sort of the chunk on one
    64-bit key per box mixed from (sample, hash of the name, the bits of x1, y1, x2, y2); a collision only sends
    a sample to the per-box checks, which report the real duplicates (`checks.box_hits`)."""
    import numpy as np

    if len(boxes) < 2:
        return np.zeros(0, dtype=np.int64)
    names = chain.from_iterable(s.labels if s.labels else s.phrases for s in samples)
    key = np.fromiter(map(hash, names), dtype=np.int64, count=len(boxes)).view(np.uint64)
    bits = (boxes + 0.0).view(np.uint64)  # [N, 4] (-0.0 -> 0.0: the tuples compare equal too)
    key ^= owner.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for c in range(4):  # equal (sample, name, box) rows get equal keys; different ones collide with odds ~2**-64
        key *= np.uint64(0xBF58476D1CE4E5B9)
        key ^= bits[:, c]
        key ^= key >> np.uint64(29)
    order = np.argsort(key)
    k = key[order]
    return owner[order][1:][k[1:] == k[:-1]]


def size_histogram(boxes: Any) -> list[int]:
    """Counts per size bin of the boxes with a finite positive width and height."""
    import numpy as np

    with np.errstate(invalid="ignore", over="ignore"):
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ok = np.isfinite(w) & np.isfinite(h) & (w > 0) & (h > 0)
        s = np.sqrt(w[ok] * h[ok])
        bins = np.where(s < 1, 0, np.minimum(SIZE_BINS - 1, 1 + np.floor(np.log2(np.maximum(s, 1.0)))))
    return np.bincount(bins.astype(np.int64), minlength=SIZE_BINS).tolist()
