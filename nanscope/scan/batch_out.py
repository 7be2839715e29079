"""`--batch-out batch.pt --ids 17,42 --images DIR`: the scanned samples as a batch file in nanscope's schema,
so `nanscope inspect CKPT batch.pt` replays exactly the samples the scan flagged.

Each image is loaded and transformed with groundingdino's own transforms as its inference does
(`RandomResize([size], max_size=1333)`, `ToTensor`, `Normalize` with the ImageNet mean/std, which also
turns the pixel x1, y1, x2, y2 boxes into normalized cx, cy, w, h), then padded into one tensor with
groundingdino's `nested_tensor_from_tensor_list` (its mask becomes `image_masks`). Captions, phrases
(caption.find trainers) or `tokens_positive` (span trainers) are the scan's own, so inspect builds the
same positive maps. Boxes the trainer drops (a label missing from the label map) are left out.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

from nanscope.errors import InputError

IMAGE_SIZE = 800  # groundingdino's inference resize (shorter side), as in its load_image
MAX_SIZE = 1333


def parse_ids(value: str | Sequence[Any]) -> list[str]:
    """'17,42' -> ['17', '42'] (ids compare as text: COCO image ids, ODVG line indices)."""
    ids = [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    ids = [s for s in ids if s]
    if not ids:
        raise InputError("--ids is empty; expected sample ids separated by commas, e.g. --ids 17,42")
    return ids


def build_batch(kept: Sequence[tuple[Any, Any]], ids: Sequence[str], images: str | os.PathLike[str], *,
                image_size: int = IMAGE_SIZE, max_size: int = MAX_SIZE) -> dict[str, Any]:
    """The batch dict (schema of nanscope's batch file) of the samples `ids`, in that order."""
    import torch
    from groundingdino.datasets import transforms as T
    from groundingdino.util.misc import nested_tensor_from_tensor_list
    from PIL import Image, UnidentifiedImageError

    from nanscope.replay.batch import IMAGENET_MEAN, IMAGENET_STD

    by_id = {str(smp.id): (smp, pr) for smp, pr in kept}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise InputError(f"--ids {', '.join(missing)} not found in the scanned samples (this shard); sample ids are "
                         "COCO image ids or ODVG line indices (0-based), as the scan report lists them")
    tf = T.Compose([T.RandomResize([image_size], max_size=max_size), T.ToTensor(),
                    T.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])
    tensors, captions, targets = [], [], []
    for i in ids:
        smp, pr = by_id[i]
        path = Path(images) / smp.file
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"sample {i}: image {str(path)!r} cannot be read ({exc}); --batch-out needs the image "
                             "(see NS208)") from None
        keep = [j for j in range(len(smp.boxes)) if j not in pr.dropped and _spans_ok(pr, j)]
        boxes = torch.tensor([smp.boxes[j] for j in keep], dtype=torch.float32).reshape(-1, 4)
        img_t, tgt = tf(img, {"boxes": boxes})
        tensors.append(img_t)
        captions.append(pr.caption)
        t: dict[str, Any] = {"boxes": tgt["boxes"].reshape(-1, 4)}
        if pr.spans is not None:
            t["tokens_positive"] = [[list(s) for s in pr.spans[j]] for j in keep]
        else:
            t["phrases"] = [pr.phrases[j] for j in keep]
        targets.append(t)
    nested = nested_tensor_from_tensor_list(tensors)
    out: dict[str, Any] = {"images": nested.tensors, "captions": captions, "targets": targets}
    if bool(nested.mask.any()):
        out["image_masks"] = nested.mask
    return out


def _spans_ok(pr: Any, j: int) -> bool:
    """Spans the batch schema accepts (non-empty, inside the caption); phrases always pass."""
    if pr.spans is None:
        return True
    sp = pr.spans[j]
    return bool(sp) and all(0 <= b < e <= len(pr.caption) for b, e in sp)


def write_batch(path: str | os.PathLike[str], kept: Sequence[tuple[Any, Any]], ids: Sequence[str],
                images: str | os.PathLike[str], *, image_size: int = IMAGE_SIZE) -> Path:
    """Validate with nanscope's batch schema and save (written to a temporary name, then renamed)."""
    import torch

    from nanscope.replay.batch import validate_batch
    from nanscope.safe_io import write_atomic

    raw = build_batch(kept, ids, images, image_size=image_size)
    validate_batch(raw, source="--batch-out")
    buf = io.BytesIO()  # serialized in memory (a batch of a few images): a full disk fails in our writer, named
    torch.save(raw, buf)
    write_atomic(path, buf.getvalue(), name="--batch-out")  # random temporary name, O_EXCL | O_NOFOLLOW, renamed
    return Path(path)
