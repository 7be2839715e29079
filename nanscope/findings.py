"""Typed findings and the catalogue of stable codes.

A `Finding` is what every analyzer returns: a stable code, a severity, a count, where it happened
(a tuple of small dicts that name image, layer, query, token, box, phrase, module ...), a message and
a fix hint. Nothing here prints.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from nanscope.errors import UnknownCodeError


class Severity(str, enum.Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


@dataclass(frozen=True)
class CodeInfo:
    code: str
    title: str
    severity: Severity  # the default severity; an analyzer may raise or lower it with a reason
    hint: str
    # Causes rank above symptoms: when several errors exist, the lowest `order` is shown first.
    order: int


def _c(code: str, title: str, severity: Severity, hint: str, order: int) -> CodeInfo:
    return CodeInfo(code, title, severity, hint, order)


E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFO

CATALOGUE: dict[str, CodeInfo] = {
    c.code: c
    for c in [
        _c("NS001", "non-finite loss term", E,
           "A symptom: look at the cause findings above it; `nanscope verify-fix` checks a masked criterion.", 90),
        _c("NS101", "padded text positions reach the classification loss", W,
           "Drop padded positions before the loss: `torch.masked_select(logits, text_mask)` as MMDetection, "
           "Open-GroundingDino and transformers do, or use `nanscope.criterion.SetCriterion`.", 20),
        _c("NS102", "positive target on a padded or truncated token", E,
           "Shorten the caption (fewer categories per prompt) or drop boxes whose phrase falls past "
           "max_text_len, as MMDetection's check_for_positive_overflow does.", 10),
        _c("NS103", "empty positive map row", E,
           "Fix the phrase/span so it maps to tokens, or drop the box; a matcher that normalizes rows divides 0 by 0.", 11),
        _c("NS104", "caption longer than max_text_len", W,
           "Split the categories over several prompts so each caption fits in max_text_len tokens.", 12),
        _c("NS105", "non-binary positive map used as class targets", W,
           "Binarize the positive map (`positive_map > 0`) before using it as focal-loss targets.", 13),
        _c("NS106", "phrase located at the wrong place in the caption", E,
           "The box trains on the tokens of another word: give the trainer character spans (tokens_positive) "
           "instead of caption.find(phrase), or rename the phrase so it is not part of another phrase.", 15),
        _c("NS110", "caption too long for transformers' GroundingDino (its forward raises)", E,
           "Split the categories over several prompts so each caption fits in max_text_len tokens, or tokenize "
           "with truncation=True, max_length=max_text_len (boxes whose phrases fall past it lose their targets).", 8),
        _c("NS111", "class labels index another image's phrases (transformers' class offset)", E,
           "Give every image of a batch the same caption (e.g. all categories in one prompt), or run transformers' "
           "loss image by image: its _get_target_classes_one_hot offsets image i's class labels by "
           "len(label_maps[i]) instead of the number of phrases of the images before it.", 15),
        _c("NS112", "class label outside the caption's phrases", E,
           "class_labels index the '.'-separated phrases of the image's own caption (0 .. n_phrases-1): rebuild "
           "them from the caption you pass; transformers' loss raises IndexError past the end and silently "
           "takes a row from the end for a negative label.", 12),
        _c("NS113", "transformers' encoder loss terms see no image / carry no gradient", I,
           "Expected transformers behaviour, nothing to fix: do not read loss_ce_enc as a measure of the image "
           "features, and do not expect loss_bbox_enc / loss_giou_enc to train anything.", 96),
        _c("NS201", "invalid target box", E,
           "Target boxes must be finite, normalized cxcywh in [0, 1] with width and height > 0 "
           "(convert xyxy / pixel boxes with torchvision.ops.box_convert and divide by the image size).", 14),
        _c("NS202", "non-finite predicted box", E,
           "Predicted boxes went non-finite inside the model: see the origin trace (NS301/NS302).", 40),
        _c("NS203", "non-finite matching cost", E,
           "scipy's linear_sum_assignment raises on such costs: mask padded tokens in the class cost, guard "
           "empty positive rows, and fix non-finite boxes.", 50),
        _c("NS204", "image with no boxes", I,
           "Fine when loss normalizers are clamped to at least 1 (nanscope's criterion does this). A grounding "
           "line with no regions crashes Open-GroundingDino's loader: drop it (nanscope scan --write-clean).", 95),
        _c("NS205", "duplicate boxes", W,
           "Remove the repeated annotation: two targets with the same label and box compete for one query "
           "in the Hungarian matching.", 96),
        _c("NS206", "box outside the image or under 1 px", W,
           "MMDetection's loaders drop such boxes; other trainers train on them. Drop them (nanscope scan "
           "--write-clean) or fix the coordinates (ODVG: absolute x1, y1, x2, y2 pixels; COCO: x, y, w, h).", 16),
        _c("NS207", "category id missing from the label map", E,
           "Add the id to the label map, or fix the annotation's label / category_id; Open-GroundingDino raises "
           "KeyError on it and the box has no phrase.", 8),
        _c("NS208", "image file missing or unreadable", E,
           "Fix the file name or the --images folder; the trainer's loader raises on the first such sample.", 4),
        _c("NS209", "image size differs from the annotation", E,
           "Boxes are normalized by the real image size: re-export width/height, or the boxes were drawn on "
           "another version of the image (resized or EXIF-rotated).", 9),
        _c("NS210", "caption or phrase is not valid Unicode (a lone surrogate)", E,
           "Re-export the text as valid UTF-8 or drop the sample (nanscope scan --write-clean drops it): a lone "
           "UTF-16 surrogate ('\\ud800' in the JSON) has no UTF-8 form, and the trainer's tokenizer raises on it "
           "(tokenizers: TypeError) when the sample comes up.", 4),
        _c("NS301", "first non-finite value in the forward", E,
           "Fix the operation named here: its inputs held no NaN (no inf, for an inf origin) and its output does.", 5),
        _c("NS302", "first non-finite value in the backward", E,
           "The backward of the named operation produced the first non-finite gradient.", 6),
        _c("NS303", "half-precision overflow risk", W,
           "Values near the fp16 range overflow under autocast: use bfloat16, keep this module in fp32, or clamp.", 30),
        _c("NS304", "non-finite input images", E,
           "The data pipeline produced NaN/inf pixels: check decoding, normalization and augmentations.", 1),
        _c("NS305", "non-finite parameters or buffers", E,
           "The checkpoint already holds NaN/inf weights: resume from an earlier checkpoint.", 2),
        _c("NS310", "image with no valid pixels (all padding)", E,
           "Drop the image or fix its padding mask (True marks padded pixels): groundingdino divides by each "
           "image's valid ratio (get_reference_points, masks_to_boxes), which is 0 for an image that is all padding.", 1),
        _c("NS311", "activation exploded past float32's safe range (a diverged weight)", W,
           "A weight of this module diverged: resume from an earlier checkpoint, lower the learning rate and clip "
           "gradients (clip_grad_norm_); the NaN downstream is where the next square or product overflows.", 2),
        _c("NS306", "checkpoint does not fit the model", E,
           "Use the config the checkpoint was trained with; missing weights stay random when loading with strict=False.", 3),
        _c("NS308", "LoRA target that can never train", W,
           "Target the parent module instead: LoRA on nn.MultiheadAttention itself (PEFT wraps it and merges "
           "on the fly), or leave out_proj out of target_modules; MultiheadAttention reads out_proj.weight "
           "directly, so a LoRA on it is skipped in the forward and its lora_B gets no gradient.", 30),
        _c("NS309", "LoRA scaling assumed", W,
           "Keep the adapter's adapter_config.json next to the checkpoint (or pass --adapter DIR): the replay "
           "needs lora_alpha and r to scale the LoRA update as training did.", 31),
        _c("NS307", "AMP loss-scale collapse", E,
           "The GradScaler keeps skipping steps: gradients overflow every step. Lower the learning rate, "
           "use bfloat16, or find the overflowing module with `nanscope inspect`.", 7),
        # Beyond NaN: a finite loss that supervises the wrong thing (measured on the user's criterion).
        _c("NS401", "negatives never trained", E,
           "Compute the classification loss over every query (unmatched queries get all-zero targets), not only "
           "over the matched ones: `src_logits[idx]` alone never teaches the other queries 'no object'.", 60),
        _c("NS402", "positives ignored by a classification term", E,
           "Build this term's targets from the matched boxes' positive-map rows (token labels); a term whose "
           "targets are all zero trains every query towards 'no object'.", 61),
        _c("NS403", "matcher hides non-finite costs", E,
           "Let the matcher refuse non-finite costs (or use nanscope's HungarianMatcher) and fix what makes them: "
           "drop boxes with an empty positive-map row; replacing NaN by 0 or the largest float matches such a "
           "box to an arbitrary query.", 62),
        _c("NS404", "one loss term drowns the others", W,
           "Normalize the classification sum as the reference trainers do (matched queries or GT boxes, at least "
           "1) or rebalance weight_dict, so no term is 100x the others on a healthy batch.", 63),
        _c("NS405", "targets disagree with the tokenizer", W,
           "Build positive maps from character spans with the model's own tokenizer (offsets / char_to_token), "
           "not by splitting the token range or with another tokenizer.", 64),
        _c("NS406", "text mask not truncated to max_text_len", E,
           "Truncate the text mask (and the tokenizer call that makes it) to max_text_len, as the model truncates "
           "its input: a [B, L > 256] mask against [B, Q, 256] logits crashes on long captions.", 65),
    ]
}


# Data bugs only `nanscope scan` sees: they need the dataset's files (label map, image sizes, the
# annotation ids), which a replayed batch does not carry.
SCAN_ONLY = frozenset({"NS106", "NS205", "NS206", "NS207", "NS208", "NS209", "NS210"})


def code_info(code: str) -> CodeInfo:
    """Return the catalogue entry of `code`, or raise listing the valid codes."""
    try:
        return CATALOGUE[code]
    except KeyError:
        raise UnknownCodeError(
            f"unknown finding code {code!r}; valid codes: {', '.join(sorted(CATALOGUE))}"
        ) from None


def check_codes(codes: Iterable[str]) -> list[str]:
    """Validate a user list of codes (e.g. from --select); return them upper-cased."""
    out = [c.strip().upper() for c in codes if c.strip()]
    unknown = [c for c in out if c not in CATALOGUE]
    if unknown:
        raise UnknownCodeError(
            f"unknown finding code(s) {', '.join(unknown)}; valid codes: {', '.join(sorted(CATALOGUE))}"
        )
    return out


Where = Mapping[str, Any]


@dataclass(frozen=True)
class Finding:
    """One diagnosis. `where` lists up to a few concrete locations; `count` counts all of them."""

    code: str
    severity: Severity
    count: int
    message: str
    where: tuple[Where, ...] = ()
    hint: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)  # numbers for reports (per layer, per image ...)

    def __post_init__(self) -> None:
        info = code_info(self.code)
        if not self.hint:
            object.__setattr__(self, "hint", info.hint)
        object.__setattr__(self, "severity", Severity(self.severity))

    @property
    def title(self) -> str:
        return CATALOGUE[self.code].title

    @property
    def order(self) -> int:
        return CATALOGUE[self.code].order

    def with_severity(self, severity: Severity, reason: str = "") -> "Finding":
        msg = f"{self.message} {reason}".strip() if reason else self.message
        return replace(self, severity=severity, message=msg)

    def where_text(self, limit: int = 3) -> str:
        """Human text for the first `limit` locations, e.g. `image 1 box 2 'zebra' token 257 'zebra'`."""
        parts = [format_where(w) for w in self.where[:limit]]
        more = len(self.where) - limit
        if more > 0:
            parts.append(f"+{more} more")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "title": self.title,
            "severity": self.severity.value,
            "count": int(self.count),
            "where": [dict(w) for w in self.where],
            "message": self.message,
            "hint": self.hint,
            "data": _jsonable(dict(self.data)),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Finding":
        return cls(
            code=d["code"], severity=Severity(d["severity"]), count=int(d["count"]),
            message=d["message"], where=tuple(d.get("where", ())), hint=d.get("hint", ""),
            data=d.get("data", {}),
        )


_WHERE_ORDER = ("rank", "step", "sample", "annotation", "image", "layer", "term", "box", "phrase", "query", "token", "tokens",
                "token_text", "module", "op", "param", "channel", "file", "line")


def _ranges(xs: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5,9'."""
    out: list[str] = []
    for x in sorted(xs):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == x - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        elif out and "-" not in out[-1] and int(out[-1]) == x - 1:
            out[-1] = f"{out[-1]}-{x}"
        else:
            out.append(str(x))
    return ",".join(out)


def format_where(w: Where) -> str:
    """One location as text: `image 2 box 1 'small red bird' tokens 281-283 ...`."""
    bits = []
    keys = [k for k in _WHERE_ORDER if k in w] + sorted(k for k in w if k not in _WHERE_ORDER)
    if "tokens" in w and "token" in keys:
        keys.remove("token")
    if "token_text" in w and str(w.get("phrase", "")).lower() == str(w["token_text"]).lower():
        keys.remove("token_text")  # the tokens spell the phrase: say it once
    for k in keys:
        v = w[k]
        if v is None:
            continue
        if k in ("phrase", "token_text"):
            bits.append(repr(v))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
            bits.append(f"{k} {_ranges(list(v))}")
        else:
            bits.append(f"{k} {v}")
    return " ".join(bits)


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Errors first, then causes before symptoms (catalogue order), then larger counts."""
    return sorted(findings, key=lambda f: (-f.severity.rank, f.order, -f.count, f.code))


def worst_severity(findings: Iterable[Finding]) -> Severity | None:
    worst = None
    for f in findings:
        if worst is None or f.severity.rank > worst.rank:
            worst = f.severity
    return worst


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x in (float("inf"), float("-inf")):
            return "inf" if x > 0 else "-inf"
        return x
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return _jsonable(x.item())
    if isinstance(x, enum.Enum):
        return x.value
    return x
