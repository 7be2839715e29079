"""Check 4: after against nanscope's `masked_select` reference of every preset, and why a term differs.

For the preset a stack ships its own loss for (transformers' for `hf`), that loss is the reference.

Each preset's `SetCriterion(preset, impl="masked_select")` runs on the same outputs and targets; the
distance to each is reported and the closest is named. A differing term is explained by its
normalizer when after x N equals the reference x its own normalizer, to `NORMALIZER_RTOL`, for one of
the batch counts NS404 uses (`nanscope.replay.loss_scale.BatchCounts`): e.g. a `loss_ce` divided by
`matched queries + 0.1 * unmatched queries` (DETR's eos_coef-weighted mean) instead of `matched
queries`. The counts come from the batch alone: a Hungarian matching assigns min(Q, N_i) queries in image i.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from nanscope.result import Check

NORMALIZER_RTOL = 1e-4  # float32 sums agree to ~1e-6: "exactly" means this close, not NS404's 1%
CLS_TERMS = ("loss_ce",)
BOX_TERMS = ("loss_bbox", "loss_giou")


def reference_normalizer(preset: Any, term: str, counts: Any) -> tuple[str, float] | None:
    """The count the reference of `preset` divides `term` by, as (candidate name, value >= 1)."""
    base = next((b for b in CLS_TERMS + BOX_TERMS if term == b or term.startswith(b + "_")), None)
    if base is None:
        return None
    if base in CLS_TERMS and preset.cls_normalizer == "matched_queries":
        return "matched queries", max(float(counts.matched), 1.0)
    return "GT boxes", max(float(counts.boxes), 1.0)


def explain(term: str, got: float, ref: float, preset: Any, counts: Any) -> tuple[str, str] | None:
    """(normalizer, its value and the reference's) when after / reference is exactly a change of
    normalizer: after x N == reference x N_ref for a batch count N (`nanscope.replay.loss_scale`)."""
    from nanscope.replay.loss_scale import explain_normalizer

    refn = reference_normalizer(preset, term, counts)
    if refn is None:
        return None
    unnormalized = ref * refn[1]  # the reference's sum before its normalizer
    fit = explain_normalizer(got, unnormalized, counts)
    if fit is None or fit[0] == refn[0] or abs(unnormalized / got - fit[1]) > NORMALIZER_RTOL * fit[1]:
        return None
    return fit[0], f"{fit[1]:g} instead of {refn[0]} = {refn[1]:g}"


def stack_reference_terms(after: Mapping[str, float], outputs: Mapping[str, Any],
                          targets: Sequence[Mapping[str, Tensor]], spec: str, after_criterion: Any = None,
                          extras: Mapping[str, Any] | None = None) -> tuple[dict[str, float], dict[str, float], str]:
    """(after's terms, the stack's own loss's terms, a note) for check 4 on a stack that ships its loss.

    Such a loss need not guard empty positive-map rows (transformers' matcher divides 0 by 0): then
    both it and `after_criterion` run on the targets without those boxes, and the note names them.
    """
    from nanscope.replay.criterion_inputs import select_boxes
    from nanscope.user_code import call_criterion, load_criterion
    from nanscope.verify.checks import floats

    ref = load_criterion(spec)[0]
    keep = [t["positive_map"].sum(-1) > 0 for t in targets]
    dropped = [(i, j) for i, k in enumerate(keep) for j in (~k).nonzero().flatten().tolist()]
    note = ""
    if dropped and after_criterion is not None:
        targets = [select_boxes(t, k) for t, k in zip(targets, keep)]
        with torch.no_grad():
            after = floats(call_criterion(after_criterion[0], outputs, targets, name=after_criterion[1],
                                          extras=extras))
        shown = ", ".join(f"image {i} box {j}" for i, j in dropped[:4])
        note = (f" (both without the {len(dropped)} box(es) whose positive-map row is empty - {shown} -, on which "
                "the reference's matcher divides 0 by 0)")
    with torch.no_grad():
        return dict(after), floats(call_criterion(ref, outputs, targets, name="the reference")), note


def compare_presets(after: Mapping[str, float], outputs: Mapping[str, Any],
                    targets: Sequence[Mapping[str, Tensor]], preset: str, *, stack_reference: str | None = None,
                    after_criterion: Any = None, extras: Mapping[str, Any] | None = None) -> Check:
    """Check 4 (see the module docstring). Passes when after equals the `preset` reference; that reference
    is the stack's own loss (`stack_reference`, MODULE:ATTR) when the stack ships one for `preset`."""
    from nanscope.criterion.presets import PRESETS
    from nanscope.criterion.set_criterion import SetCriterion
    from nanscope.errors import CriterionError
    from nanscope.replay.loss_scale import batch_counts
    from nanscope.terms import canonical
    from nanscope.verify.checks import RTOL, compare_terms, floats

    refs: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name in PRESETS:
            refs[name] = floats(SetCriterion(name, impl="masked_select")(outputs, targets))
    cmps = {name: compare_terms(after, ref) for name, ref in refs.items()}
    what = f"vs SetCriterion(preset={preset!r}, impl='masked_select')"
    if stack_reference is not None:
        try:
            own_after, refs[preset], note = stack_reference_terms(after, outputs, targets, stack_reference,
                                                                  after_criterion, extras)
        except CriterionError as exc:
            return Check(4, "after equals the masked_select reference", False,
                         f"vs the stack's own loss {stack_reference}: the reference raised: {exc}", {})
        cmps[preset] = compare_terms(own_after, refs[preset])
        what = f"vs the stack's own loss {stack_reference}{note}"

    def distance(name: str) -> tuple[Any, ...]:
        cm = cmps[name]
        return (not cm["equal"], len(cm["mismatched"]) + len(cm["missing"]), cm["max_rel_diff"], name != preset)

    closest = min(PRESETS, key=distance)
    counts = batch_counts(outputs, targets)  # the same counts NS404 explains a loss scale with
    got = {canonical(k): v for k, v in after.items()}
    groups: dict[tuple[str, str], list[str]] = {}
    for term in cmps[closest]["mismatched"]:
        why = explain(term, got[term], refs[closest][term], PRESETS[closest], counts)
        if why is not None:
            groups.setdefault(why, []).append(term)
    reasons = [f"{', '.join(terms)} divided by {expr} (= {value})" for (expr, value), terms in groups.items()]
    unexplained = [t for t in cmps[closest]["mismatched"] if not any(t in ts for ts in groups.values())]

    def one(name: str) -> str:
        cm = cmps[name]
        if cm["equal"]:
            return f"{name}: equal (max rel. diff {cm['max_rel_diff']:.2g})"
        return (f"{name}: {len(cm['mismatched'])} of {cm['compared']} terms differ"
                + (f", {len(cm['missing'])} missing" if cm["missing"] else "")
                + f" (max rel. diff {cm['max_rel_diff']:.2g})")

    cm = cmps[preset]
    detail = (f"{what}: max rel. diff {cm['max_rel_diff']:.2g} "
              f"over {cm['compared']} terms (tolerance {RTOL:g}); every preset: {'; '.join(one(n) for n in PRESETS)}; "
              f"closest: {closest}")
    if reasons:
        detail += f"; vs {closest}: " + "; ".join(reasons)
    if unexplained:
        detail += ("; not explained by a normalizer: " + ", ".join(
            f"{k} {got[k]:.6g} vs {refs[closest][k]:.6g}" for k in unexplained[:4]))
    missing = cmps[closest]["missing"]
    if cmps[closest]["equal"] and closest != preset:
        why_short = f"it equals the {closest} reference instead (pass --preset {closest})"
        detail += f". After equals the {closest} reference: pass --preset {closest}"
    elif cm["equal"]:
        why_short = ""
    else:
        clauses = [f"differs from the {closest} reference by " + "; ".join(reasons)] if reasons else []
        if unexplained:
            clauses.append(f"differs from the {closest} reference in {len(unexplained)} term(s) not explained by "
                           f"a normalizer ({', '.join(unexplained)})")
        if missing:
            clauses.append(f"lacks {len(missing)} term(s) of the {closest} reference ({', '.join(missing)})")
        why_short = "; ".join(clauses)
    numbers = {**cm, "reference": refs[preset], "presets": {n: {k: cmps[n][k] for k in
               ("equal", "max_rel_diff", "mismatched", "missing", "compared")} for n in PRESETS},
               "closest": closest, "normalizers": {expr: terms for (expr, _), terms in groups.items()},
               "counts": dataclasses.asdict(counts), "why": why_short}
    return Check(4, "after equals the masked_select reference", cm["equal"], detail, numbers)
