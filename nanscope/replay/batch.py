"""The batch file: what a trainer saves with `torch.save` so nanscope can replay one step.

Schema (a dict):
    images    Tensor [B, 3, H, W]: float (already normalized) or uint8 (0-255, normalized here with
              groundingdino's ImageNet mean/std)
    captions  list of B non-empty strings
    targets   list of B dicts, each with
                boxes            Tensor [N, 4], normalized cxcywh
                phrases          list of N strings (the phrase each box refers to), or
                tokens_positive  list of N lists of [begin, end) character spans into the caption
                                 (ODVG/GLIP style); one of the two is required when N > 0
                positive_map     optional Tensor [N, T]: the trainer's own token targets (0/1, or
                                 row-normalized: > 0 is positive), used only when a target has
                                 neither phrases nor tokens_positive
                extra            optional dict: the trainer's own target keys (labels, size, ...)
                                 kept by nanscope.watch; tensors, numbers, strings, lists and dicts
                                 of them. Criteria see them next to nanscope's keys.
                class_labels     optional list of N ints: the index of each box's '.'-separated phrase
                                 (what transformers' GroundingDino loss takes as labels)
    image_masks  optional Tensor [B, H, W] bool, True on padded pixels (the mask of groundingdino's
                 NestedTensor when images of different sizes were padded into one batch)
Validation errors name the field and index, e.g. `targets[1].boxes has shape [3, 5]; expected [N, 4]`.
The Hugging Face form (pixel_values, input_ids, attention_mask, labels) is another schema:
see `nanscope.replay.hf_batch` (`nanscope.replay.batch_file.read_batch` reads either form).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanscope.errors import BatchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_IMAGE_SIDE = 64  # the backbone's four stride-2 stages and the deformable levels need at least this
# Peak memory grows with the pixels: the demo model replayed 4000x4000 at ~620 bytes per pixel (9.9 GB).
# Above this side nanscope refuses before allocating; groundingdino's own transforms cap the long side at 1333.
MAX_BOXES = 10_000  # boxes per image (datasets have at most a few hundred; V3Det's densest images ~ 1000)
MAX_CAPTION_CHARS = 65_536  # 256 tokens are ~1-2k characters; captions past this are refused before tokenizing
MAX_IMAGE_SIDE = int(os.environ.get("NANSCOPE_MAX_IMAGE_SIDE", "2048"))
BYTES_PER_PIXEL = 620  # measured peak of the demo model's replay per input pixel; larger backbones use more


@dataclass(frozen=True)
class Target:
    boxes: torch.Tensor  # [N, 4] cxcywh, normalized
    phrases: tuple[str, ...] | None  # one per box
    spans: tuple[tuple[tuple[int, int], ...], ...] | None  # per box, character spans
    positive_map: torch.Tensor | None = None  # [N, T] the trainer's own map; used without phrases and spans
    extra: Mapping[str, Any] | None = None  # the trainer's own keys, kept as given (weights_only types)
    class_labels: tuple[int, ...] | None = None  # per box, index of its '.'-separated phrase (transformers' labels)


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # [B, 3, H, W] float32, normalized
    captions: tuple[str, ...]
    targets: tuple[Target, ...]
    source: str = ""  # the file it came from, for messages
    image_masks: torch.Tensor | None = None  # [B, H, W] bool, True on padded pixels

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def num_boxes(self) -> int:
        return sum(int(t.boxes.shape[0]) for t in self.targets)

    def to_dict(self) -> dict[str, Any]:
        """The schema dict (CPU tensors), as `torch.save` writes it."""
        targets = []
        for t in self.targets:
            d: dict[str, Any] = {"boxes": t.boxes.detach().cpu()}
            if t.phrases is not None:
                d["phrases"] = list(t.phrases)
            if t.spans is not None:
                d["tokens_positive"] = [[list(s) for s in spans] for spans in t.spans]
            if t.positive_map is not None:
                d["positive_map"] = t.positive_map.detach().cpu()
            if t.extra:
                d["extra"] = dict(t.extra)
            if t.class_labels is not None:
                d["class_labels"] = list(t.class_labels)
            targets.append(d)
        out = {"images": self.images.detach().cpu(), "captions": list(self.captions), "targets": targets}
        if self.image_masks is not None:
            out["image_masks"] = self.image_masks.detach().cpu()
        return out


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] in 0-255 -> float normalized like groundingdino; float images pass through."""
    if images.dtype == torch.uint8:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (images.float() / 255.0 - mean) / std
    return images.float()


def _spans(value: Any, where: str, caption: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise BatchError(f"{where} is {value!r}; expected a non-empty list of [begin, end] character spans")
    out = []
    for k, span in enumerate(value):
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(x, int) for x in span)):
            raise BatchError(f"{where}[{k}] is {span!r}; expected [begin, end] with two integers")
        beg, end = int(span[0]), int(span[1])
        if beg >= end:
            what = "empty (begin == end)" if beg == end else "reversed (begin > end)"
            raise BatchError(f"{where}[{k}] is [{beg}, {end}], {what}; expected [begin, end) with begin < end")
        if not (0 <= beg < end <= len(caption)):
            raise BatchError(
                f"{where}[{k}] is [{beg}, {end}], outside its caption of {len(caption)} characters; "
                "expected 0 <= begin < end <= len(caption)"
            )
        out.append((beg, end))
    return tuple(out)


def _positive_map(value: Any, where: str, n: int) -> torch.Tensor | None:
    """A trainer's positive map [N, T]: finite, >= 0 (binary or row-normalized); None when absent."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise BatchError(f"{where} is a {type(value).__name__}; expected a tensor [{n}, T]")
    if value.dim() != 2 or value.shape[0] != n or value.shape[1] < 1:
        raise BatchError(f"{where} has shape {list(value.shape)}; expected [{n}, T] (one row per box)")
    if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.bool, torch.uint8, torch.int64,
                                                                                   torch.int32)):
        raise BatchError(f"{where} has dtype {value.dtype}; expected float, int or bool")
    v = value.float()
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise BatchError(f"{where} has negative or non-finite entries; expected 0/1 or row-normalized weights")
    return v


_EXTRA_LEAVES = (torch.Tensor, str, int, float, bool, type(None))


def _check_extra(value: Any, where: str, depth: int = 0) -> None:
    """`extra` holds what torch.load(weights_only=True) reads: tensors, numbers, strings, lists, dicts."""
    if depth > 8:
        raise BatchError(f"{where} nests deeper than 8 levels; expected a flat dict of the trainer's target keys")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise BatchError(f"{where} has a key of type {type(k).__name__}; expected str keys")
            _check_extra(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for k, v in enumerate(value):
            _check_extra(v, f"{where}[{k}]", depth + 1)
    elif not isinstance(value, _EXTRA_LEAVES):
        raise BatchError(f"{where} is a {type(value).__name__}; expected tensors, numbers, strings, lists or dicts")


def _class_labels(value: Any, where: str, n: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    labels = torch.as_tensor(value)
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.numel() != n:
        raise BatchError(f"{where} is {value!r}; expected {n} integers (the phrase index of each box)")
    return tuple(int(x) for x in labels.reshape(-1).tolist())


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _memory_bytes() -> int | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _check_counts(raw: Any, source: str) -> None:
    """Boxes per image and caption lengths, before any matcher or tokenizer sees them (its cost grows with both)."""
    if not isinstance(raw, Mapping):
        return
    caps = raw.get("captions")
    for i, c in enumerate(caps if isinstance(caps, (list, tuple)) else []):
        if isinstance(c, str) and len(c) > MAX_CAPTION_CHARS:
            raise BatchError(f"{source}: captions[{i}] has {len(c)} characters; expected at most {MAX_CAPTION_CHARS} "
                             f"(the model reads 256 tokens, a few thousand characters; tokenizing more costs "
                             "memory quadratic in its length)")
    tgts = raw.get("targets")
    for i, t in enumerate(tgts if isinstance(tgts, (list, tuple)) else []):
        boxes = t.get("boxes") if isinstance(t, Mapping) else None
        n = int(boxes.shape[0]) if isinstance(boxes, torch.Tensor) and boxes.dim() else (
            len(boxes) if isinstance(boxes, (list, tuple)) else 0)
        if n > MAX_BOXES:
            raise BatchError(f"{source}: targets[{i}].boxes has {n} boxes; expected at most {MAX_BOXES} per image "
                             "(the matcher's cost matrix is queries x boxes)")


def check_replayable(raw: Any, source: str) -> None:
    """Refuse a batch file no model can replay, before anything large is allocated: no images, images
    below MIN_IMAGE_SIDE or above MAX_IMAGE_SIDE, or an estimated peak memory above the machine's.
    `raw`: the loaded dict, nanscope's form (images) or the Hugging Face one (pixel_values); other
    shapes are left to the schema check."""
    _check_counts(raw, source)
    images = raw.get("images", raw.get("pixel_values")) if isinstance(raw, Mapping) else None
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        return
    b, _, h, w = (int(x) for x in images.shape)
    if b == 0:
        raise BatchError(f"{source}: images has shape {list(images.shape)}, no images; expected [B, 3, H, W] "
                         "with B >= 1")
    if min(h, w) < MIN_IMAGE_SIDE:
        raise BatchError(f"{source}: images are {h}x{w} pixels; the model needs at least "
                         f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (replay the images at the size the trainer used)")
    if max(h, w) > MAX_IMAGE_SIDE:
        est = b * h * w * BYTES_PER_PIXEL / 2**30
        raise BatchError(f"{source}: images are {h}x{w} pixels (B={b}), above the limit of {MAX_IMAGE_SIDE} pixels "
                         f"a side; the replay would need about {est:.1f} GiB or more (~{BYTES_PER_PIXEL} bytes per "
                         "pixel for the demo model, more for larger backbones). Resize as the trainer's transforms "
                         "do (long side 1333), or raise NANSCOPE_MAX_IMAGE_SIDE")
    est = b * h * w * BYTES_PER_PIXEL
    have = _memory_bytes()
    if have and est > have:
        raise BatchError(f"{source}: images are {b}x{h}x{w} pixels; the replay would need about {est / 2**30:.1f} GiB "
                         f"(~{BYTES_PER_PIXEL} bytes per pixel for the demo model), more than this machine's "
                         f"{have / 2**30:.1f} GiB of memory. Replay fewer images (the failing one) or smaller ones")


def validate_batch(raw: Any, source: str = "batch") -> Batch:
    """Check a raw batch dict against the schema and return a `Batch`; raise `BatchError` naming the field."""
    if not isinstance(raw, Mapping):
        raise BatchError(f"{source} holds a {type(raw).__name__}; expected a dict with images, captions, targets")
    missing = [k for k in ("images", "captions", "targets") if k not in raw]
    if missing:
        raise BatchError(f"{source} has no {', '.join(missing)}; expected keys images, captions, targets "
                         "(or the Hugging Face form: pixel_values, input_ids, attention_mask, labels)")
    images = raw["images"]
    if not isinstance(images, torch.Tensor):
        raise BatchError(f"images is a {type(images).__name__}; expected a tensor [B, 3, H, W]")
    if images.dim() != 4 or images.shape[1] != 3:
        raise BatchError(f"images has shape {list(images.shape)}; expected [B, 3, H, W]")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise BatchError(f"images has dtype {images.dtype}; expected float (normalized) or uint8")
    b = int(images.shape[0])
    if b == 0:
        raise BatchError(f"{source}: images has shape {list(images.shape)}, no images; expected B >= 1")
    captions = raw["captions"]
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise BatchError(f"captions is a {type(captions).__name__}; expected a list of {b} strings")
    if len(captions) != b:
        raise BatchError(f"captions has {len(captions)} entries; expected {b} (one per image)")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise BatchError(f"captions[{i}] is a {type(c).__name__}; expected a string")
        if not c.strip():
            raise BatchError(f"captions[{i}] is empty; expected the text prompt of image {i}")
    targets = raw["targets"]
    if not isinstance(targets, Sequence) or len(targets) != b:
        n = len(targets) if isinstance(targets, Sequence) else type(targets).__name__
        raise BatchError(f"targets has {n} entries; expected a list of {b} dicts (one per image)")
    out: list[Target] = []
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping) or "boxes" not in t:
            raise BatchError(f"targets[{i}] is not a dict with 'boxes'; expected {{boxes, phrases | tokens_positive | "
                             "positive_map}}")
        boxes = t["boxes"]
        if not isinstance(boxes, torch.Tensor):
            try:
                boxes = torch.as_tensor(boxes, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise BatchError(f"targets[{i}].boxes is {_short(boxes)}; expected a tensor or list of [cx, cy, w, h] "
                                 "numbers, shape [N, 4]") from None
        if boxes.is_complex() or not (boxes.is_floating_point() or boxes.dtype in (torch.int64, torch.int32)):
            raise BatchError(f"targets[{i}].boxes has dtype {boxes.dtype}; expected float [N, 4] (normalized cxcywh)")
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise BatchError(f"targets[{i}].boxes has shape {list(boxes.shape)}; expected [N, 4]")
        n = int(boxes.shape[0])
        phrases = spans = None
        if "phrases" in t and t["phrases"] is not None:
            ph = t["phrases"]
            if isinstance(ph, str) or not isinstance(ph, Sequence) or not all(isinstance(p, str) for p in ph):
                raise BatchError(f"targets[{i}].phrases is {ph!r}; expected a list of {n} strings")
            if len(ph) != n:
                raise BatchError(f"targets[{i}].phrases has {len(ph)} entries for {n} boxes; expected one per box")
            phrases = tuple(ph)
        if "tokens_positive" in t and t["tokens_positive"] is not None:
            tp = t["tokens_positive"]
            if not isinstance(tp, Sequence) or len(tp) != n:
                k = len(tp) if isinstance(tp, Sequence) else type(tp).__name__
                raise BatchError(f"targets[{i}].tokens_positive has {k} entries for {n} boxes; expected one per box")
            spans = tuple(_spans(s, f"targets[{i}].tokens_positive[{j}]", captions[i]) for j, s in enumerate(tp))
        pmap = _positive_map(t.get("positive_map"), f"targets[{i}].positive_map", n)
        if n > 0 and phrases is None and spans is None and pmap is None:
            raise BatchError(f"targets[{i}] has {n} boxes but no 'phrases', 'tokens_positive' or 'positive_map'")
        extra = t.get("extra")
        if extra is not None:
            _check_extra(extra, f"targets[{i}].extra")
        out.append(Target(boxes=boxes.float(), phrases=phrases, spans=spans, positive_map=pmap,
                          extra=dict(extra) if extra else None,
                          class_labels=_class_labels(t.get("class_labels"), f"targets[{i}].class_labels", n)))
    masks = raw.get("image_masks")
    if masks is not None:
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
            raise BatchError(f"image_masks is a {getattr(masks, 'dtype', type(masks).__name__)}; expected a bool tensor [B, H, W]")
        if tuple(masks.shape) != (b, int(images.shape[2]), int(images.shape[3])):
            raise BatchError(f"image_masks has shape {list(masks.shape)}; expected [{b}, {images.shape[2]}, {images.shape[3]}] "
                             "(True on padded pixels)")
    return Batch(images=normalize_images(images), captions=tuple(captions), targets=tuple(out), source=source,
                 image_masks=masks)


def load_batch(path: str | os.PathLike[str]) -> Batch:
    """Load and validate a batch file written with `torch.save` (read with weights_only=True)."""
    raw = read_raw(path)
    check_replayable(raw, str(path))
    return validate_batch(raw, source=str(path))


def read_raw(path: str | os.PathLike[str]) -> Any:
    """The file's object as torch.load reads it with weights_only=True (a BatchError naming the file otherwise)."""
    p = Path(path)
    if p.exists() and not p.is_file():
        kind = "a folder" if p.is_dir() else "not a regular file (a device, pipe or socket)"
        raise BatchError(f"batch file {str(p)!r} is {kind}; expected a file saved with torch.save")
    if not p.is_file():
        raise BatchError(f"batch file {str(p)!r} does not exist")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BatchError(
            f"batch file {str(p)!r} could not be read as a torch file of plain tensors, strings and lists "
            f"({first[:200]}); expected a dict saved with torch.save"
        ) from None
    from nanscope.load_bounds import check_loaded

    check_loaded(raw, f"batch file {str(p)!r}", error=BatchError)  # sizes, nesting, expanded tensors: before any pass
    return raw


def save_batch(path: str | os.PathLike[str], batch: Batch | Mapping[str, Any]) -> Path:
    """Write a batch in the schema (validated first), through a temporary file and a rename."""
    import io

    from nanscope.safe_io import write_atomic

    b = batch if isinstance(batch, Batch) else validate_batch(batch)
    p = Path(path)
    buf = io.BytesIO()
    torch.save(b.to_dict(), buf)
    write_atomic(p, buf.getvalue())  # the path holds the old file or the whole new one
    return p
