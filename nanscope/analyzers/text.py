"""Where text padding meets the loss: NS101 padded logits, NS102 positives on padded/truncated tokens,
NS104 captions longer than max_text_len."""

from __future__ import annotations

import math

import torch
from torchvision.ops import sigmoid_focal_loss

from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import register
from nanscope.findings import Finding, Severity

MAX_WHERE = 8  # locations listed per finding; `count` has them all


def padded_counts(logits: torch.Tensor, positive_maps: list[torch.Tensor]) -> list[dict[str, int]]:
    """Per image: `-inf` cells a loss over all T columns sees, split by target 0 and 1, and how many
    values a plain sigmoid focal loss turns non-finite there.

    logits: [B, Q, T]; positive_maps: B tensors [N_i, T] (box i's target row goes to one matched query).
    Targets are placed on the first N_i queries: the counts do not depend on which queries are matched,
    because ContrastiveEmbed masks whole columns.
    """
    # The focal loss is elementwise and finite at every finite logit, so the non-finite count follows
    # from the loss at the four (non-finite logit, target) pairs, weighted by how often each occurs.
    ends = torch.tensor([-math.inf, -math.inf, math.inf, math.inf])
    bad_at = (~torch.isfinite(sigmoid_focal_loss(ends, torch.tensor([0.0, 1.0, 0.0, 1.0]), alpha=0.25, gamma=2.0,
                                                 reduction="none"))).tolist()  # [4]
    out = []
    for i in range(logits.shape[0]):
        lg = logits[i]  # [Q, T]
        neg_inf = torch.isneginf(lg)
        col_invalid = neg_inf.all(dim=0)  # [T]
        n = min(positive_maps[i].shape[0], lg.shape[0])
        pos = positive_maps[i][:n].to(lg.device) > 0  # [n, T]: the first n queries get the boxes' targets
        pos_inf = torch.isposinf(lg)
        counts = torch.stack([neg_inf.sum(), (pos & neg_inf[:n]).sum(), pos_inf.sum(), (pos & pos_inf[:n]).sum(),
                              torch.isnan(lg).sum(), col_invalid.sum()]).tolist()
        total, target1, pinf, pinf1, nan, invalid = (int(c) for c in counts)
        nonfinite = nan + sum(k * b for k, b in zip((total - target1, target1, pinf - pinf1, pinf1), bad_at))
        out.append({
            "inf_cells": total,
            "inf_target0": total - target1,
            "inf_target1": target1,
            "invalid_columns": invalid,
            "nonfinite_focal": nonfinite,
        })
    return out


def _nonfinite_terms(terms: object) -> list[str]:
    if not terms:
        return []
    return sorted(k for k, v in terms.items() if not bool(torch.isfinite(torch.as_tensor(v)).all()))  # type: ignore[attr-defined]


@register("NS101", needs=("logits",))
def padded_logits(ctx: AnalysisContext) -> list[Finding]:
    assert ctx.logits is not None
    maps = [t.positive_map for t in ctx.texts]
    per_layer = {name: padded_counts(lg, maps) for name, lg in ctx.logits.items()}
    total = sum(c["inf_cells"] for counts in per_layer.values() for c in counts)
    if total == 0:
        return []
    nonfinite = sum(c["nonfinite_focal"] for counts in per_layer.values() for c in counts)
    where = []
    last = list(per_layer)[-1] if "enc" not in per_layer else [k for k in per_layer if k != "enc"][-1]
    for i, c in enumerate(per_layer[last]):
        if c["inf_cells"]:
            where.append({"layer": last, "image": i, "columns": c["invalid_columns"],
                          "target0": c["inf_target0"], "target1": c["inf_target1"]})
    message = (
        f"{total} -inf logits (padded or masked text positions) over {len(per_layer)} layer(s) would reach a "
        f"classification loss over all {ctx.max_text_len} columns; a plain sigmoid focal loss is non-finite at "
        f"{nonfinite} of them."
    )
    severity = Severity.WARNING
    broken = _nonfinite_terms(ctx.loss_terms)
    fixed: set[str] = set()  # the criterion's terms that the padded positions make non-finite
    if ctx.loss_terms is None and (ctx.notes.get("criterion_error") or ctx.notes.get("criterion_label_error")):
        message += (" Your criterion failed before producing loss terms (see the findings above), so whether it "
                    "drops them is unknown.")
    elif ctx.loss_terms is None:
        message += " Run with --criterion MODULE:ATTR to check whether your loss drops them."
    elif broken:
        fixed = set(broken) - set(_nonfinite_terms(ctx.loss_terms_padding_sanitized))
        if fixed:
            severity = Severity.ERROR
            message += (f" They reach your criterion: {', '.join(sorted(fixed))} become finite when only the "
                        "padded positions are made finite.")
    else:
        message += " Your criterion's terms are all finite: it drops them."
        severity = Severity.INFO
    data = {"per_layer": per_layer, "total_inf_cells": total, "nonfinite_focal": nonfinite, "terms": sorted(fixed)}
    return [Finding("NS101", severity, total, message, tuple(where[:MAX_WHERE]), data=data)]


@register("NS102")
def positive_on_padding(ctx: AnalysisContext) -> list[Finding]:
    where = []
    n_tokens = 0
    for i, info in enumerate(ctx.texts):
        mask = ctx.text_mask[i] if ctx.text_mask is not None else None
        for bt in info.boxes:
            bad = set(bt.cut)
            if mask is not None:
                bad |= {t for t in bt.kept if not bool(mask[t])}
            if not bad:
                continue
            toks = sorted(bad)
            n_tokens += len(toks)
            where.append({"image": i, "box": bt.box, "phrase": bt.phrase, "token": toks[0], "tokens": toks,
                          "token_text": " ".join(info.token_text(t) for t in toks),
                          "why": "truncated" if toks[0] >= ctx.max_text_len else "masked"})
    if not where:
        return []
    msg = (f"{n_tokens} positive target token(s) of {len(where)} box(es) fall on text positions the model "
           f"masks or truncates (max_text_len={ctx.max_text_len}): an unmasked loss sees target 1 at logit -inf "
           "(NaN); a masked loss silently drops these positives.")
    return [Finding("NS102", Severity.ERROR, n_tokens, msg, tuple(where[:MAX_WHERE]))]


@register("NS104")
def caption_too_long(ctx: AnalysisContext) -> list[Finding]:
    if ctx.stack is not None and not getattr(ctx.stack, "truncates_captions", True):
        return []  # this stack does not truncate: its forward raises, and NS110 says so
    out_where = []
    for i, info in enumerate(ctx.texts):
        if not info.truncated:
            continue
        cut = [bt.phrase for bt in info.boxes if bt.cut]
        out_where.append({"image": i, "tokens": info.num_tokens, "max_text_len": ctx.max_text_len,
                          "phrases_cut": cut})
    if not out_where:
        return []
    n_cut = sum(len(w["phrases_cut"]) for w in out_where)
    msg = (f"{len(out_where)} caption(s) are longer than max_text_len={ctx.max_text_len} tokens "
           f"(longest {max(w['tokens'] for w in out_where)}); {n_cut} target phrase(s) lose tokens to truncation.")
    if len(out_where) == 1:  # the cause a report leads with: say it plainly
        msg = (f"The caption of image {out_where[0]['image']} is {out_where[0]['tokens']} tokens, longer than "
               f"max_text_len={ctx.max_text_len}; {n_cut} target phrase(s) lose tokens to truncation.")
    return [Finding("NS104", Severity.WARNING, len(out_where), msg, tuple(out_where[:MAX_WHERE]))]
