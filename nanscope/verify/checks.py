"""The nine checks of `nanscope verify-fix`, each a function returning a `Check` (PASS or FAIL with numbers).

1. before is non-finite (the bug is reproduced), or a note that it was already finite (PASS);
2. every after term is finite, and none is exactly 0 while target boxes exist;
3. after's gradients are finite for every layer's logits and boxes and every model parameter
   (before's first non-finite parameter gradient, in the order autograd accumulated them, is named);
4. after equals nanscope's `masked_select` reference for the preset (`RTOL`);
5. after equals before on valid positions only: before runs with every invalid logit replaced by a
   stand-in whose sigmoid underflows to exactly 0, so a target-0 focal or BCE term there is exactly 0
   in value and gradient (a second stand-in must give identical terms, which proves it for the
   user's own before), and with positive targets on invalid positions removed;
6. on a batch without padding (only the text columns valid in every image; boxes whose tokens all
   fall elsewhere dropped), after equals before: the fix is a no-op where nothing is wrong;
7. before's and after's `.matcher` (DETR convention) assign the same pairs per layer and image,
   wherever before's matching succeeds (a matcher raises on a non-finite cost);
8. training steps on a copy of the model with after keep every term finite and lower the total;
9. the peak memory of after's loss + backward is at most `MEMORY_LIMIT` times before's.

A criterion that raises on the batches built for checks 5-7 fails that check (with the user's frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from nanscope import progress
from nanscope.errors import CriterionError
from nanscope.result import Check
from nanscope.user_code import Criterion, call_criterion, user_frame

RTOL = 1e-5  # relative tolerance of the equality checks 4, 5 and 6
STAND_INS = (-1.0e4, -2.0e4)  # sigmoid underflows to exactly 0 in fp16, bf16, fp32 and fp64; both fit fp16
MEMORY_LIMIT = 1.5  # check 9 fails when after's peak exceeds this multiple of before's

Outputs = Mapping[str, Any]
Targets = Sequence[Mapping[str, Tensor]]
TrainLog = tuple[list[float], int | None, list[str]]  # see check_training


@dataclass
class CriterionRun:
    """One criterion on the replayed outputs, backpropagated into the model."""

    terms: dict[str, float]
    total: float
    differentiable: bool
    output_grads: dict[str, int | None]  # "dec0.pred_logits" -> non-finite count; None: no gradient reached it
    nonfinite_params: list[str]  # in the order autograd accumulated their gradients
    params_with_grad: int
    params_total: int
    loss_peak: int  # bytes, the criterion's forward alone
    peak: int  # bytes, forward + backward

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.terms.values()) and math.isfinite(self.total)


def floats(terms: Mapping[str, Tensor]) -> dict[str, float]:
    return {k: float(v.detach().float().sum()) for k, v in terms.items()}


def layers(outputs: Outputs) -> list[tuple[str, dict[str, Any]]]:
    """(name, one layer's outputs with the text mask): 'dec0'..'decN-1' (the last is pred_logits), 'enc'."""
    shared = {"text_token_mask": outputs["text_token_mask"]} if outputs.get("text_token_mask") is not None else {}
    aux = list(outputs.get("aux_outputs") or ())
    out = [(f"dec{i}", {**shared, **a}) for i, a in enumerate(aux)]
    out.append((f"dec{len(aux)}", {**shared, "pred_logits": outputs["pred_logits"],
                                   "pred_boxes": outputs["pred_boxes"]}))
    if outputs.get("enc_outputs") is not None:
        out.append(("enc", {**shared, **outputs["enc_outputs"]}))
    return out


def _map_logits(outputs: Outputs, fn: Any, mask: Tensor | None) -> dict[str, Any]:
    """Copy of `outputs` with `fn` applied to every layer's pred_logits and text_token_mask set to `mask`."""
    def one(d: Mapping[str, Any]) -> dict[str, Any]:
        return {**d, "pred_logits": fn(d["pred_logits"])}

    out = one(outputs)
    out["aux_outputs"] = [one(a) for a in outputs.get("aux_outputs") or ()]
    if outputs.get("enc_outputs") is not None:
        out["enc_outputs"] = one(outputs["enc_outputs"])
    if mask is not None:
        out["text_token_mask"] = mask
    return out


def valid_positions(outputs: Outputs) -> Tensor:
    from nanscope.criterion.text_mask import text_validity

    return text_validity(outputs)[0]  # [B, T]


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
        tg.append({**t, "boxes": t["boxes"][kept], "positive_map": pm[kept]})
    return out, tg, {"columns": int(cols.numel()), "boxes_kept": sum(len(t["boxes"]) for t in tg),
                     "boxes_dropped": dropped}


def term_layer(key: str, last: str) -> str:
    """'loss_ce' -> last, 'loss_ce_0' -> 'dec0', 'loss_ce_enc' -> 'enc'."""
    head, _, tail = key.rpartition("_")
    if head and tail == "enc":
        return "enc"
    if head and tail.isdigit():
        return f"dec{tail}"
    return last


def compare_terms(got: Mapping[str, float], ref: Mapping[str, float], rtol: float = RTOL) -> dict[str, Any]:
    """Per-term relative difference |got - ref| / |ref| (NaN equals NaN); terms of `ref` missing from `got`."""
    rel: dict[str, float] = {}
    for k, r in ref.items():
        if k not in got:
            continue
        g = got[k]
        if not (math.isfinite(g) and math.isfinite(r)):
            rel[k] = 0.0 if (g == r or (g != g and r != r)) else math.inf
        else:
            rel[k] = abs(g - r) / max(abs(r), 1e-12) if g != r else 0.0
    missing = sorted(set(ref) - set(got))
    worst = max(rel.values(), default=0.0)
    bad = sorted(k for k, v in rel.items() if v > rtol)
    return {"max_rel_diff": worst, "mismatched": bad, "missing": missing, "compared": len(rel),
            "equal": not bad and not missing and bool(rel)}


def _fmt_terms(terms: Mapping[str, float], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={terms[k]:.6g}" for k in keys)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@progress.staged("check 1 (before reproduces the bug)")
def check_reproduced(before: CriterionRun, name: str) -> Check:
    bad = [k for k, v in before.terms.items() if not math.isfinite(v)]
    numbers = {"nonfinite_terms": bad, "total": before.total}
    if bad or not math.isfinite(before.total):
        shown = _fmt_terms(before.terms, bad) or f"total={before.total}"
        detail = f"before ({name}) is non-finite: {shown}: the bug is reproduced"
    else:
        detail = (f"before ({name}) was already finite on this batch (total {before.total:.6g}): nothing to "
                  "reproduce; the other checks still compare before and after")
    return Check(1, "before reproduces the bug", True, detail, numbers)


@progress.staged("check 2 (every after term is finite)")
def check_after_finite(after: CriterionRun, num_boxes: int) -> Check:
    bad = [k for k, v in after.terms.items() if not math.isfinite(v)]
    zero = [k for k, v in after.terms.items() if v == 0.0] if num_boxes > 0 else []
    parts = []
    if bad:
        parts.append(f"non-finite: {_fmt_terms(after.terms, bad)}")
    if zero:
        parts.append(f"exactly 0 while {num_boxes} target boxes exist (the fix may have removed the targets "
                     f"too): {', '.join(zero)}")
    detail = "; ".join(parts) or f"all {len(after.terms)} after terms are finite and non-zero"
    return Check(2, "every after term is finite", not bad and not zero, detail,
                 {"terms": len(after.terms), "nonfinite": bad, "zero": zero})


@progress.staged("check 3 (after's gradients are finite)")
def check_gradients(before: CriterionRun, after: CriterionRun) -> Check:
    bad_out = {k: v for k, v in after.output_grads.items() if v}
    reached = sum(1 for v in after.output_grads.values() if v is not None)
    ok = after.differentiable and not bad_out and not after.nonfinite_params
    if not after.differentiable:
        detail = "after's total does not require grad: the criterion detached its terms (nothing would train)"
    else:
        detail = (f"after: {reached} logits/boxes tensors and {after.params_with_grad}/{after.params_total} "
                  f"parameter gradients checked, {sum(bad_out.values())} non-finite output-gradient values, "
                  f"{len(after.nonfinite_params)} non-finite parameter gradients")
        if after.nonfinite_params:
            detail += f" (first: {after.nonfinite_params[0]})"
    before_out = sum(v for v in before.output_grads.values() if v)
    if before.nonfinite_params:
        detail += (f"; before: {before_out} non-finite output-gradient values, "
                   f"{len(before.nonfinite_params)}/{before.params_with_grad} parameter gradients non-finite, "
                   f"first {before.nonfinite_params[0]}")
    else:
        detail += f"; before: {before_out} non-finite output-gradient values, every parameter gradient finite"
        if before_out:
            detail += " (the model's masked_fill backward zeroes the gradient at -inf positions)"
    numbers = {"after_nonfinite_output_grads": bad_out, "after_nonfinite_params": after.nonfinite_params[:20],
               "after_params_with_grad": after.params_with_grad, "params": after.params_total,
               "before_nonfinite_output_grads": {k: v for k, v in before.output_grads.items() if v},
               "before_nonfinite_params": len(before.nonfinite_params),
               "before_first_nonfinite_param": before.nonfinite_params[0] if before.nonfinite_params else None}
    return Check(3, "after's gradients are finite", ok, detail, numbers)


def _equality_check(cid: int, title: str, got: Mapping[str, float], ref: Mapping[str, float], what: str,
                    extra: Mapping[str, Any] | None = None, hint: str = "") -> Check:
    cmp = compare_terms(got, ref)
    detail = f"{what}: max rel. diff {cmp['max_rel_diff']:.2g} over {cmp['compared']} terms (tolerance {RTOL:g})"
    if cmp["mismatched"]:
        detail += "; differ: " + ", ".join(f"{k} {got[k]:.6g} vs {ref[k]:.6g}" for k in cmp["mismatched"][:4])
    if cmp["missing"]:
        detail += f"; missing from after: {', '.join(cmp['missing'][:6])}"
    if not cmp["equal"] and hint:
        detail += f". {hint}"
    return Check(cid, title, cmp["equal"], detail, {**cmp, **(extra or {})})


@progress.staged("check 4 (after equals the masked_select reference)")
def check_reference(after: CriterionRun, outputs: Outputs, targets: Targets, preset: str) -> Check:
    from nanscope.criterion.set_criterion import SetCriterion

    ref = SetCriterion(preset, impl="masked_select")
    with torch.no_grad():
        ref_terms = floats(ref(outputs, targets))
    return _equality_check(4, "after equals the masked_select reference", after.terms, ref_terms,
                           f"vs SetCriterion(preset={preset!r}, impl='masked_select')",
                           {"reference": ref_terms},
                           hint="If your criterion follows another trainer, pass the matching --preset")


@progress.staged("check 5 (after equals before on valid positions)")
def check_valid_only(before_crit: Criterion, before_name: str, after: CriterionRun, outputs: Outputs,
                     targets: Targets) -> Check:
    valid = valid_positions(outputs)  # [B, T]
    T = valid.shape[1]
    keep = valid[:, None, :]
    tg, removed = [], 0
    for i, t in enumerate(targets):
        pm = _width(t["positive_map"], T)
        removed += int(((pm > 0) & ~valid[i]).sum())
        tg.append({**t, "positive_map": pm * valid[i].to(pm.dtype)})
    runs = []
    try:
        with torch.no_grad():
            for value in STAND_INS:
                fill = partial(_fill, keep=keep, value=value)
                runs.append(floats(call_criterion(before_crit, _map_logits(outputs, fill, None), tg,
                                                   name=before_name)))
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
            f"(contributes exactly 0: {STAND_INS[1]:g} gives identical terms), {removed} positive targets on "
            "invalid positions removed")
    return _equality_check(5, "after equals before on valid positions", after.terms, runs[0], what, extra,
                           hint="The fix changes more than the padded positions")


@progress.staged("check 6 (the fix is a no-op without padding)")
def check_no_op(before: tuple[Criterion, str], after: tuple[Criterion, str], outputs: Outputs,
                targets: Targets) -> Check:
    out, tg, info = unpadded_batch(outputs, targets)
    if info["columns"] == 0:
        return Check(6, "the fix is a no-op without padding", False,
                     "no text column is valid in every image: an unpadded batch cannot be built from this one", info)
    try:
        with torch.no_grad():
            b = floats(call_criterion(before[0], out, tg, name=before[1]))
            a = floats(call_criterion(after[0], out, tg, name=after[1]))
    except CriterionError as exc:
        return Check(6, "the fix is a no-op without padding", False,
                     f"a criterion raised on the unpadded batch ({info['columns']} columns): {exc}", info)
    what = (f"{info['columns']} text columns valid in every image, {info['boxes_kept']} boxes kept "
            f"({info['boxes_dropped']} with no token there dropped): after vs before")
    return _equality_check(6, "the fix is a no-op without padding", a, b, what, {**info, "before": b, "after": a},
                           hint="The fix changes the loss even where nothing is padded")


@progress.staged("check 7 (the matcher assigns the same pairs)")
def check_matching(before: tuple[Criterion, str], after: tuple[Criterion, str], outputs: Outputs,
                   targets: Targets) -> Check:
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
                try:
                    pb = _pairs(mb(one, [t]))
                except Exception as exc:  # before's cost is non-finite here: nothing to compare
                    skipped.append(f"{layer} image {i}: {type(exc).__name__}")
                    continue
                try:
                    pa = _pairs(ma(one, [t]))
                except Exception as exc:
                    return Check(7, "the matcher assigns the same pairs", False,
                                 f"{after[1]}: its matcher raised on {layer} image {i}: {type(exc).__name__}: "
                                 f"{exc} (at {user_frame(exc)})", {"compared": compared})
                compared += 1
                if pa != pb:
                    differ.append(f"{layer} image {i}: {len(pa ^ pb)} pairs differ")
    detail = (f"{compared} (layer, image) matchings compared, {compared - len(differ)} identical"
              + (f"; {len(skipped)} skipped where before's matcher raised" if skipped else "")
              + (f"; {'; '.join(differ[:4])}" if differ else ""))
    return Check(7, "the matcher assigns the same pairs", not differ and compared > 0, detail,
                 {"compared": compared, "differ": differ, "skipped": skipped})


def _pairs(matches: Any) -> set[tuple[int, int]]:
    (rows, cols), = matches
    return set(zip(torch.as_tensor(rows).tolist(), torch.as_tensor(cols).tolist()))


@progress.staged("check 8 (training steps stay finite)")
def check_training(after_steps: TrainLog, before_steps: TrainLog, steps: int, lr: float) -> Check:
    """`after_steps` / `before_steps`: (total before each update, first non-finite step or None, its terms)."""
    totals, bad_step, bad_terms = after_steps
    ok = bad_step is None and len(totals) >= 2 and totals[-1] < totals[0]
    if bad_step is not None:
        detail = f"after went non-finite at step {bad_step} ({', '.join(bad_terms)})"
    else:
        change = (totals[-1] - totals[0]) / abs(totals[0]) if totals[0] else math.inf
        detail = (f"after: total {totals[0]:.6g} -> {totals[-1]:.6g} over {steps} steps ({change:+.2%}), "
                  f"every term finite" + ("" if ok else "; the loss did not go down"))
    b_totals, b_step, b_terms = before_steps
    detail += (f"; before went non-finite at step {b_step} ({', '.join(b_terms)})" if b_step is not None
               else f"; before stayed finite for {len(b_totals)} steps")
    return Check(8, "training steps with after stay finite and lower the loss", ok, detail,
                 {"after": totals, "after_nonfinite_step": bad_step, "before": b_totals,
                  "before_nonfinite_step": b_step, "before_nonfinite_terms": b_terms, "lr": lr})


@progress.staged("check 9 (peak memory)")
def check_memory(before: CriterionRun, after: CriterionRun, method: str) -> Check:
    ratio = after.peak / before.peak if before.peak else (1.0 if not after.peak else math.inf)
    detail = (f"loss + backward peak: after {_mb(after.peak)} vs before {_mb(before.peak)} ({ratio:.2f}x, limit "
              f"{MEMORY_LIMIT:g}x); loss alone {_mb(after.loss_peak)} vs {_mb(before.loss_peak)}")
    return Check(9, "after's peak memory is within the limit", ratio <= MEMORY_LIMIT, detail,
                 {"ratio": ratio, "limit": MEMORY_LIMIT, "before_bytes": before.peak, "after_bytes": after.peak,
                  "before_loss_bytes": before.loss_peak, "after_loss_bytes": after.loss_peak, "method": method})

