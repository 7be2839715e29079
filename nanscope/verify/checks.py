"""The checks of `nanscope verify-fix`, each a function returning a `Check` (PASS or FAIL with numbers).

1. before is non-finite or raises the way the bug makes it raise (transformers' class-offset IndexError,
   NS111; a matcher refusing non-finite costs): the bug is reproduced; or a note that it was already
   finite (PASS);
2. every after term is finite, and none is exactly 0 while target boxes exist;
3. after's gradients are finite for every layer's logits and boxes and every model parameter
   (before's first non-finite parameter gradient, in the order autograd accumulated them, is named);
4. after equals nanscope's `masked_select` reference for the preset (`RTOL`); every preset's distance
   is reported with the closest, and a differing term is explained by its normalizer when a count
   of the batch explains the ratio exactly (`nanscope.verify.reference`);
5. after equals before on valid positions only. Where before is already finite, that is before's own
   evaluation. Otherwise before runs with every invalid logit replaced by a stand-in whose sigmoid
   underflows to exactly 0, so a target-0 focal or BCE term there is exactly 0 in value and gradient
   (a second stand-in must give identical terms, which proves it for the user's own before), and
   with positive targets on invalid positions removed;
6. on a batch without padding (only the text columns valid in every image; boxes whose tokens all
   fall elsewhere dropped), after equals before: the fix is a no-op where nothing is wrong;
7. before's and after's `.matcher` (DETR convention) assign the same pairs per layer and image,
   wherever before's matching succeeds (a matcher raises on a non-finite cost);
8. training steps on a copy of the model with after keep every term finite and lower the total;
9. the peak memory of after's loss + backward is at most `MEMORY_LIMIT` times before's;
10. after supervises what it should: no NS401/NS402/NS403 (`nanscope.verify.supervision_check`).

Checks 4-7 live in `nanscope.verify.equivalence` (4: `nanscope.verify.reference`). A criterion that
raises on the batches built for checks 5-7 fails that check (with the user's frame).
Only loss terms are checked: the keys of the criterion's `weight_dict` when it has one, else the
tensors that require grad (`loss_keys`); metrics such as `class_error` are shown, not checked.
"Fixed" needs the `REQUIRED` checks (the NaN is gone, safely); 4-7 say whether after also equals the
reference and before (`EQUIVALENCE`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import Tensor

from nanscope import progress
from nanscope.result import Check
from nanscope.terms import canonical, loss_term_names

RTOL = 1e-5  # relative tolerance of the equality checks 4, 5 and 6
STAND_INS = (-1.0e4, -2.0e4)  # sigmoid underflows to exactly 0 in fp16, bf16, fp32 and fp64; both fit fp16
MEMORY_LIMIT = 1.5  # check 9 fails when after's peak exceeds this multiple of before's
REQUIRED = (1, 2, 3, 8, 9, 10)  # "fixed": no non-finite term or gradient, training stays finite, memory
# bounded, and the fix supervises what it should (a finite loss that trains the wrong thing is not a fix)
EQUIVALENCE = (4, 5, 6, 7)  # "and it equals the reference / before": reported, not required

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
    metrics: dict[str, float] | None = None  # returned tensors that are not loss terms (class_error, ...)
    loss_keys: tuple[str, ...] = ()  # which returned keys are loss terms (see `loss_keys`)
    raised: str | None = None  # before only: the criterion raised on the batch the way the bug makes it
    # (transformers' class-offset IndexError, NS111; a matcher refusing non-finite costs): no terms, no gradients

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.terms.values()) and math.isfinite(self.total)


def floats(terms: Mapping[str, Tensor], keys: Sequence[str] | None = None) -> dict[str, float]:
    """Each term summed to a float; only `keys` when given (a criterion's loss terms)."""
    return {k: float(v.detach().float().sum()) for k, v in terms.items() if keys is None or k in keys}


def loss_keys(crit: Any, terms: Mapping[str, Tensor]) -> tuple[str, ...]:
    """The loss terms of a criterion's output: its `weight_dict` keys with a non-zero weight (DETR convention)
    when it names some of them, else the tensors that require grad (NS401's rule), else all of them (a
    detached criterion: check 3 says so)."""
    return tuple(loss_term_names(terms, getattr(crit, "weight_dict", None))) or tuple(terms)


def layers(outputs: Outputs) -> list[tuple[str, dict[str, Any]]]:
    """(name, one layer's outputs with the text mask): 'dec0'..'decN-1' (the last is pred_logits), 'enc'."""
    shared = {k: outputs[k] for k in ("text_token_mask", "text_mask") if outputs.get(k) is not None}
    aux = list(outputs.get("aux_outputs") or ())
    out = [(f"dec{i}", {**shared, **a}) for i, a in enumerate(aux)]
    out.append((f"dec{len(aux)}", {**shared, "pred_logits": outputs["pred_logits"],
                                   "pred_boxes": outputs["pred_boxes"]}))
    if outputs.get("enc_outputs") is not None:
        out.append(("enc", {**shared, **outputs["enc_outputs"]}))
    return out


def valid_positions(outputs: Outputs) -> Tensor:
    from nanscope.criterion.text_mask import text_validity

    return text_validity(outputs)[0]  # [B, T]


def compare_terms(got: Mapping[str, float], ref: Mapping[str, float], rtol: float = RTOL) -> dict[str, Any]:
    """Per-term relative difference |got - ref| / |ref| (NaN equals NaN); terms of `ref` missing from `got`.

    Term names are compared in `canonical` form ('_interm' = '_enc')."""
    got = {canonical(k): v for k, v in got.items()}
    ref = {canonical(k): v for k, v in ref.items()}
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
    numbers = {"nonfinite_terms": bad, "total": before.total, "raised": before.raised}
    if before.raised:
        detail = f"before ({name}) raised on this batch: {before.raised}: the bug is reproduced"
    elif bad or not math.isfinite(before.total):
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
    if before.raised:
        detail += "; before raised, so it has no gradients"
    elif before.nonfinite_params:
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
    got = {canonical(k): v for k, v in got.items()}
    ref = {canonical(k): v for k, v in ref.items()}
    detail = f"{what}: max rel. diff {cmp['max_rel_diff']:.2g} over {cmp['compared']} terms (tolerance {RTOL:g})"
    if cmp["mismatched"]:
        detail += "; differ: " + ", ".join(f"{k} {got[k]:.6g} vs {ref[k]:.6g}" for k in cmp["mismatched"][:4])
    if cmp["missing"]:
        detail += f"; missing from after: {', '.join(cmp['missing'][:6])}"
    if not cmp["equal"] and hint:
        detail += f". {hint}"
    return Check(cid, title, cmp["equal"], detail, {**cmp, **(extra or {})})


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
    if b_step is not None and b_terms and b_terms[0].startswith("raised "):
        detail += f"; before {b_terms[0]} at step {b_step}"
    else:
        detail += (f"; before went non-finite at step {b_step} ({', '.join(b_terms)})" if b_step is not None
                   else f"; before stayed finite for {len(b_totals)} steps")
    return Check(8, "training steps with after stay finite and lower the loss", ok, detail,
                 {"after": totals, "after_nonfinite_step": bad_step, "before": b_totals,
                  "before_nonfinite_step": b_step, "before_nonfinite_terms": b_terms, "lr": lr})


@progress.staged("check 9 (peak memory)")
def check_memory(before: CriterionRun, after: CriterionRun, method: str) -> Check:
    if before.raised:  # nothing to compare: before stopped part-way
        return Check(9, "after's peak memory is within the limit", True,
                     f"before raised, so there is no peak to compare with; after: loss + backward {_mb(after.peak)}, "
                     f"loss alone {_mb(after.loss_peak)}",
                     {"ratio": None, "limit": MEMORY_LIMIT, "before_bytes": None, "after_bytes": after.peak,
                      "before_loss_bytes": None, "after_loss_bytes": after.loss_peak, "method": method})
    ratio = after.peak / before.peak if before.peak else (1.0 if not after.peak else math.inf)
    detail = (f"loss + backward peak: after {_mb(after.peak)} vs before {_mb(before.peak)} ({ratio:.2f}x, limit "
              f"{MEMORY_LIMIT:g}x); loss alone {_mb(after.loss_peak)} vs {_mb(before.loss_peak)}")
    return Check(9, "after's peak memory is within the limit", ratio <= MEMORY_LIMIT, detail,
                 {"ratio": ratio, "limit": MEMORY_LIMIT, "before_bytes": before.peak, "after_bytes": after.peak,
                  "before_loss_bytes": before.loss_peak, "after_loss_bytes": after.loss_peak, "method": method})
