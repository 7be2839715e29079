"""Checks 4-7 of `nanscope verify-fix`: does after also equal the reference and before (not required for FIXED).

4. after vs nanscope's `masked_select` reference of every preset (`nanscope.verify.reference`);
5. after vs before on valid positions only (before's own evaluation where before is already finite,
   else before on stand-in logits at the invalid positions);
6. after vs before on a batch without padding (only the text columns valid in every image);
7. before's and after's `.matcher` assign the same pairs per layer and image.
Every call passes the named extras (`cat_list`, `label_map`, ...) and keeps only the loss terms.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from nanscope import progress
from nanscope.errors import CriterionError
from nanscope.replay.criterion_inputs import (
    image_extras,
    restrict_extras,
    select_boxes,
    with_positive_map,
)
from nanscope.result import Check
from nanscope.stacks.capture import map_layers
from nanscope.user_code import Criterion, call_criterion, call_matcher, user_frame
from nanscope.verify.checks import (
    STAND_INS,
    CriterionRun,
    Outputs,
    Targets,
    _equality_check,
    compare_terms,
    floats,
    layers,
    valid_positions,
)


def _map_logits(outputs: Outputs, fn: Any, mask: Tensor | None) -> dict[str, Any]:
    """Copy of `outputs` with `fn` applied to every layer's pred_logits and the text masks set to `mask`."""
    return map_layers(outputs, lambda d: {**d, "pred_logits": fn(d["pred_logits"])}, mask)


def _fill(logits: Tensor, *, keep: Tensor, value: float) -> Tensor:
    return torch.where(keep, logits, torch.full((), value, dtype=logits.dtype, device=logits.device))


def _width(pm: Tensor, width: int) -> Tensor:
    if pm.shape[-1] >= width:
        return pm[..., :width]
    return torch.nn.functional.pad(pm, (0, width - pm.shape[-1]))


def unpadded_batch(outputs: Outputs,
                   targets: Targets) -> tuple[dict[str, Any], list[dict[str, Tensor]], dict[str, Any]]:
    """Outputs and targets restricted to the text columns valid in every image: nothing is padded.

    Boxes whose positive-map row has no positive left are dropped (an empty row is another bug).
    Returns (outputs, targets, info) with pred_logits [B, Q, K] and text_token_mask all True [B, K].
    """
    valid = valid_positions(outputs)
    cols = valid.all(0).nonzero().flatten()  # [K]
    mask = torch.ones(valid.shape[0], cols.numel(), dtype=torch.bool, device=valid.device)
    out = _map_logits(outputs, lambda lg: lg.index_select(-1, cols), mask)
    tg, dropped = [], 0
    for t in targets:
        pm = _width(t["positive_map"], valid.shape[1]).index_select(-1, cols.to(t["positive_map"].device))
        kept = pm.sum(-1) > 0
        dropped += int((~kept).sum())
        tg.append(select_boxes(with_positive_map(t, pm), kept))
    return out, tg, {"columns": int(cols.numel()), "boxes_kept": sum(len(t["boxes"]) for t in tg),
                     "boxes_dropped": dropped}


def masked_batch(outputs: Outputs, targets: Targets,
                 extras: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Tensor]], dict[str, Any]]:
    """`unpadded_batch` at the outputs' own width: the columns not valid in every image are masked, not cut.

    For a criterion that builds its own tensors at a fixed width (Open-GroundingDino's `create_positive_map`
    at 256 columns): logits [B, Q, T] as they are, with the masked columns set to `STAND_INS[0]` (sigmoid
    exactly 0: a target-0 focal or BCE term there is exactly 0), text masks [B, T] = the kept columns in
    every image, positive maps and label maps zeroed outside them. Returns (outputs, targets, extras).
    """
    valid = valid_positions(outputs)
    kept = valid.all(0)  # [T]
    mask = kept.expand_as(valid).clone()
    out = _map_logits(outputs, partial(_fill, keep=kept, value=STAND_INS[0]), mask)
    tg = []
    for t in targets:
        pm = _width(t["positive_map"], valid.shape[1])
        pm = pm * kept.to(pm.device, pm.dtype)
        tg.append(select_boxes(with_positive_map(t, pm), pm.sum(-1) > 0))
    ex = dict(extras)
    for key in ("label_map", "label_maps"):
        if key in ex:
            ex[key] = [m * _width(kept[None].to(m.device, m.dtype), m.shape[-1]) for m in ex[key]]
    return out, tg, ex


@progress.staged("check 4 (after equals the masked_select reference)")
def check_reference(after: CriterionRun, outputs: Outputs, targets: Targets, preset: str, *,
                    stack_reference: str | None = None, after_criterion: tuple[Criterion, str] | None = None,
                    extras: Mapping[str, Any] | None = None) -> Check:
    """`stack_reference`: the stack's own loss for `preset` (MODULE:ATTR), then check 4's reference."""
    from nanscope.verify.reference import compare_presets

    return compare_presets(after.terms, outputs, targets, preset, stack_reference=stack_reference,
                           after_criterion=after_criterion, extras=extras)


@progress.staged("check 5 (after equals before on valid positions)")
def check_valid_only(before_crit: Criterion, before_name: str, after: CriterionRun, outputs: Outputs,
                     targets: Targets, *, before: CriterionRun | None = None,
                     extras: Mapping[str, Any] | None = None) -> Check:
    if before is not None and before.finite:  # before masks the padding itself: its own value is the reference
        return _equality_check(5, "after equals before on valid positions", after.terms, before.terms,
                               "before is already finite on this batch, so after is compared with before's own "
                               "evaluation (no stand-in logits)", {"before_own_evaluation": True},
                               hint="The fix changes more than the padded positions")
    keys = before.loss_keys if before is not None and before.loss_keys else None
    valid = valid_positions(outputs)  # [B, T]
    T = valid.shape[1]
    keep = valid[:, None, :]
    tg, removed = [], 0
    for i, t in enumerate(targets):
        pm = _width(t["positive_map"], T)
        removed += int(((pm > 0) & ~valid[i]).sum())
        tg.append(with_positive_map(t, pm * valid[i].to(pm.dtype)))
    runs = []
    try:
        with torch.no_grad():
            for value in STAND_INS:
                fill = partial(_fill, keep=keep, value=value)
                runs.append(floats(call_criterion(before_crit, _map_logits(outputs, fill, None), tg,
                                                   name=before_name, extras=extras), keys))
    except CriterionError as exc:
        return Check(5, "after equals before on valid positions", False,
                     f"before raised on the stand-in outputs: {exc}", {})
    invariance = compare_terms(runs[1], runs[0], rtol=0.0)
    extra = {"invalid_logits_per_layer": int((~valid).sum()) * int(outputs["pred_logits"].shape[1]),
             "positives_on_invalid_positions_removed": removed, "stand_ins": list(STAND_INS),
             "stand_in_max_rel_diff": invariance["max_rel_diff"], "before_valid_only": runs[0]}
    if not invariance["equal"]:
        return Check(5, "after equals before on valid positions", False,
                     f"before still depends on the value at invalid positions (stand-ins {STAND_INS[0]:g} and "
                     f"{STAND_INS[1]:g} give different {', '.join(invariance['mismatched'][:4])}): it cannot be "
                     "evaluated on valid positions alone", extra)
    what = (f"before with its {int((~valid).sum())} invalid (image, text position) pairs set to {STAND_INS[0]:g} "
            f"(contributes exactly 0 to a sum: {STAND_INS[1]:g} gives identical terms; a criterion that averages "
            f"over positions still counts them), {removed} positive targets on invalid positions removed")
    return _equality_check(5, "after equals before on valid positions", after.terms, runs[0], what, extra,
                           hint="The fix changes more than the padded positions")


@progress.staged("check 6 (the fix is a no-op without padding)")
def check_no_op(before: tuple[Criterion, str], after: tuple[Criterion, str], outputs: Outputs,
                targets: Targets, *, extras: Mapping[str, Any] | None = None,
                keys: tuple[Sequence[str] | None, Sequence[str] | None] = (None, None)) -> Check:
    out, tg, info = unpadded_batch(outputs, targets)
    if info["columns"] == 0:
        return Check(6, "the fix is a no-op without padding", False,
                     "no text column is valid in every image: an unpadded batch cannot be built from this one", info)
    cut = restrict_extras(extras or {}, valid_positions(outputs).all(0).nonzero().flatten())
    how = f"cut to the {info['columns']} text columns valid in every image"
    try:
        b, a = _both(before, after, out, tg, cut, keys)
    except CriterionError as sliced:
        # A criterion that builds its own tensors at a fixed width (positive maps at 256 columns) cannot take
        # cut outputs: keep the width and mask the other columns instead.
        out, tg, cut = masked_batch(outputs, targets, extras or {})
        how = (f"at the outputs' full width ({int(outputs['pred_logits'].shape[-1])} columns), the "
               f"{info['columns']} valid in every image unmasked and the rest masked (cut outputs raised: "
               f"{str(sliced)[:200]})")
        info = {**info, "width_kept": True}
        try:
            b, a = _both(before, after, out, tg, cut, keys)
        except CriterionError as exc:
            return Check(6, "the fix is a no-op without padding", True,
                         f"not checked: this criterion cannot run on a batch without padding, neither cut to the "
                         f"{info['columns']} columns valid in every image ({sliced}) nor masked at full width "
                         f"({exc})", {**info, "skipped": True})
    what = (f"{how}, {info['boxes_kept']} boxes kept ({info['boxes_dropped']} with no token there dropped): "
            "after vs before")
    return _equality_check(6, "the fix is a no-op without padding", a, b, what, {**info, "before": b, "after": a},
                           hint="The fix changes the loss even where nothing is padded")


def _both(before: tuple[Criterion, str], after: tuple[Criterion, str], out: Outputs, tg: Targets,
          extras: Mapping[str, Any], keys: tuple[Sequence[str] | None, Sequence[str] | None]) -> tuple[Any, Any]:
    with torch.no_grad():
        b = floats(call_criterion(before[0], out, tg, name=before[1], extras=extras), keys[0])
        a = floats(call_criterion(after[0], out, tg, name=after[1], extras=extras), keys[1])
    return b, a


@progress.staged("check 7 (the matcher assigns the same pairs)")
def check_matching(before: tuple[Criterion, str], after: tuple[Criterion, str], outputs: Outputs,
                   targets: Targets, *, extras: Mapping[str, Any] | None = None) -> Check:
    """Each matcher is called per layer and image, with its extra parameters (label_map, ...) by name."""
    mb, ma = getattr(before[0], "matcher", None), getattr(after[0], "matcher", None)
    if not callable(mb) or not callable(ma):
        who = " and ".join(n for (c, n), m in ((before, mb), (after, ma)) if not callable(m))
        return Check(7, "the matcher assigns the same pairs", True,
                     f"not checked: {who} has no callable .matcher attribute (DETR convention)", {"skipped": True})
    compared, skipped, differ = 0, [], []
    with torch.no_grad():
        for layer, d in layers(outputs):
            for i, t in enumerate(targets):
                one = {k: (v[i:i + 1] if isinstance(v, Tensor) else v) for k, v in d.items()}
                per_image = image_extras(extras or {}, i)
                try:
                    pb = _pairs(call_matcher(mb, one, [t], extras=per_image))
                except Exception as exc:  # before's cost is non-finite here: nothing to compare
                    skipped.append(f"{layer} image {i}: {type(exc).__name__}")
                    continue
                try:
                    pa = _pairs(call_matcher(ma, one, [t], extras=per_image))
                except Exception as exc:
                    return Check(7, "the matcher assigns the same pairs", False,
                                 f"{after[1]}: its matcher raised on {layer} image {i}: {type(exc).__name__}: "
                                 f"{exc} (at {user_frame(exc)})", {"compared": compared})
                compared += 1
                if pa != pb:
                    differ.append(f"{layer} image {i}: {len(pa ^ pb)} pairs differ")
    detail = (f"{compared} (layer, image) matchings compared, {compared - len(differ)} identical"
              + (f"; {len(skipped)} skipped where before's matcher raised ({skipped[0]})" if skipped else "")
              + (f"; {'; '.join(differ[:4])}" if differ else ""))
    return Check(7, "the matcher assigns the same pairs", not differ and compared > 0, detail,
                 {"compared": compared, "differ": differ, "skipped": skipped})


def _pairs(matches: Any) -> set[tuple[int, int]]:
    (rows, cols), = matches
    return set(zip(torch.as_tensor(rows).tolist(), torch.as_tensor(cols).tolist()))
