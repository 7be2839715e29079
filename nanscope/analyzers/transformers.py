"""What transformers' GroundingDino does with a batch that groundingdino-py would take: NS110 captions over
max_text_len (its head raises), NS111 the class-label offset with different captions per image, NS112
class labels outside the caption's phrases, NS113 the encoder loss terms (info).

They run for stacks that say so (`truncates_captions = False`; label maps exist for the transformers
stack only) and return nothing otherwise. Label maps and class labels are transformers' own
(`nanscope.stacks.transformers.labels`), computed from each caption's token ids as the model sees them.
"""

from __future__ import annotations

from typing import Any

import torch

from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import register
from nanscope.findings import Finding, Severity

MAX_WHERE = 8  # locations listed per finding; `count` has them all
TRANSFORMERS = "transformers"


def _is_transformers(ctx: AnalysisContext) -> bool:
    return getattr(ctx.stack, "name", None) == TRANSFORMERS


def _uses_builtin_loss(ctx: AnalysisContext) -> bool:
    """No criterion given (the model's built-in loss is what `labels=` trains) or transformers' own."""
    return ctx.criterion_name is None or ctx.criterion_name.startswith(TRANSFORMERS)


def _phrase_text(info: Any, lm: torch.Tensor, row: int) -> str:
    toks = lm[row].nonzero().flatten().tolist()
    return " ".join(info.token_text(t) for t in toks).replace(" ##", "")


@register("NS110")
def caption_crashes_forward(ctx: AnalysisContext) -> list[Finding]:
    if ctx.stack is None or getattr(ctx.stack, "truncates_captions", True):
        return []
    where = [{"image": i, "tokens": info.num_tokens, "max_text_len": ctx.max_text_len,
              "phrases_cut": [bt.phrase for bt in info.boxes if bt.cut]}
             for i, info in enumerate(ctx.texts) if info.truncated]
    if not where:
        return []
    longest = max(w["tokens"] for w in where)
    msg = (f"{len(where)} caption(s) are longer than max_text_len={ctx.max_text_len} tokens (longest {longest}): "
           f"{type(ctx.model).__name__}'s forward raises `RuntimeError: The size of tensor a ({longest}) must match the "
           f"size of tensor b ({ctx.max_text_len})` in its contrastive head instead of truncating. nanscope replayed "
           f"these captions cut to {ctx.max_text_len} tokens (as the model's text backbone cuts them) to diagnose "
           "the rest of the batch.")
    return [Finding("NS110", Severity.ERROR, len(where), msg, tuple(where[:MAX_WHERE]))]


def _labels(ctx: AnalysisContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from nanscope.stacks.transformers.labels import class_labels, label_map

    maps = [label_map(info) for info in ctx.texts]
    return maps, [class_labels(t, info, lm) for t, info, lm in zip(ctx.batch.targets, ctx.texts, maps)]


@register("NS111")
def class_offset(ctx: AnalysisContext) -> list[Finding]:
    if not _is_transformers(ctx) or len(ctx.texts) < 2:
        return []
    from nanscope.stacks.transformers.labels import offset_rows

    maps, labels = _labels(ctx)
    rows = offset_rows(maps, labels)
    where, crash = [], 0
    for i, per in enumerate(rows):
        for j, r in enumerate(per):
            if i == 0 or r["same"] or r["right"] is None:  # image 0 is right; NS112 covers bad labels
                continue
            w: dict[str, Any] = {"image": i, "box": j, "phrase": ctx.phrase_of(i, j), "class": r["class"]}
            if r["row"] is None:
                crash += 1
                w["why"] = (f"row {r['class']} + {len(maps[i])} = {r['class'] + len(maps[i])} is past the "
                            f"{sum(len(m) for m in maps)} rows of the batch's label maps: IndexError")
            else:
                w["why"] = (f"trained on image {r['image']}'s phrase {r['phrase']} "
                            f"'{_phrase_text(ctx.texts[r['image']], maps[r['image']], r['phrase'])}' (row {r['row']}) "
                            f"instead of its own (row {r['right']})")
            where.append(w)
    if not where:
        return []
    images = sorted({w["image"] for w in where})
    msg = (f"{len(where)} box(es) of image(s) {', '.join(map(str, images))} get another caption's classification "
           "targets from transformers' loss: _get_target_classes_one_hot adds len(label_maps[i]) to image i's class "
           "labels instead of the phrase count of the images before it, which is only right when the captions' "
           "phrases sit at the same token positions. Matching and box terms are unaffected; loss_ce is not.")
    if crash:
        msg += f" For {crash} of them the index runs past the label maps and the loss raises IndexError."
    severity = Severity.ERROR
    if not _uses_builtin_loss(ctx):
        severity = Severity.WARNING
        msg += f" Your criterion ({ctx.criterion_name}) is not transformers' loss: this applies if you also train with labels=."
    return [Finding("NS111", severity, len(where), msg, tuple(where[:MAX_WHERE]),
                    data={"images": images, "index_errors": crash})]


@register("NS112")
def class_label_range(ctx: AnalysisContext) -> list[Finding]:
    if not _is_transformers(ctx):
        return []
    maps, _ = _labels(ctx)
    where = []
    for i, (t, lm) in enumerate(zip(ctx.batch.targets, maps)):
        for j, c in enumerate(t.class_labels or ()):
            if not 0 <= c < len(lm):
                why = ("negative: torch indexing silently takes a row from the end" if c < 0
                       else "past the last phrase: IndexError in the matcher")
                where.append({"image": i, "box": j, "class": c, "phrases": len(lm), "why": why})
    if not where:
        return []
    msg = (f"{len(where)} class label(s) are outside their caption's '.'-separated phrases (labels[i].class_labels "
           "must be 0 .. n_phrases-1 of image i's own caption); transformers' GroundingDinoHungarianMatcher "
           "indexes label_maps[i] with them.")
    return [Finding("NS112", Severity.ERROR, len(where), msg, tuple(where[:MAX_WHERE]))]


@register("NS113", needs=("logits",))
def encoder_terms(ctx: AnalysisContext) -> list[Finding]:
    if not _is_transformers(ctx) or ctx.logits is None or "enc" not in ctx.logits:
        return []
    enc = ctx.logits["enc"]
    evidence = ""
    for i in range(len(ctx.batch)):
        for k in range(i + 1, len(ctx.batch)):
            if (ctx.batch.captions[i] == ctx.batch.captions[k] and torch.equal(enc[i], enc[k])
                    and not torch.equal(ctx.batch.images[i], ctx.batch.images[k])):
                evidence = (f" Measured here: images {i} and {k} share a caption and their encoder logits are "
                            "bitwise equal although their pixels differ.")
                break
        if evidence:
            break
    msg = ("With two_stage=True transformers' encoder terms differ from groundingdino-py's: loss_ce_enc scores "
           "the learned query embeddings (query_position_embeddings) against the projected caption, so the image "
           "does not enter it, and loss_bbox_enc / loss_giou_enc compare encoder_pred_boxes, which are detached "
           "(no gradient reaches the model from them)." + evidence)
    return [Finding("NS113", Severity.INFO, 1, msg, ({"layer": "enc", "term": "loss_ce_enc, loss_bbox_enc, "
                                                      "loss_giou_enc"},))]
