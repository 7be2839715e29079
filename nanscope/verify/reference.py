"""Check 4: after against nanscope's `masked_select` reference of every preset, and why a term differs.

Each preset's `SetCriterion(preset, impl="masked_select")` runs on the same outputs and targets; the
distance to each is reported and the closest is named. A differing term is explained by its
normalizer when the ratio after / reference equals reference normalizer / a count of the batch to
`NORMALIZER_RTOL`: e.g. a `loss_ce` divided by `num_pos + 0.1 * num_neg` (DETR's weighted mean with
eos_coef 0.1) instead of `num_pos` is exactly num_pos / (num_pos + 0.1 * num_neg) of the reference.
The counts come from the batch alone: a Hungarian matching assigns min(Q, N_i) queries in image i.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from nanscope.result import Check

NORMALIZER_RTOL = 1e-4  # float32 sums agree to ~1e-6; a wrong candidate misses by far more
CLS_TERMS = ("loss_ce",)
BOX_TERMS = ("loss_bbox", "loss_giou")


def batch_counts(outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, float]:
    """The counts a loss can be normalized by, from the shapes, the text mask and the positive maps."""
    from nanscope.verify.checks import valid_positions

    B, Q, T = outputs["pred_logits"].shape
    valid = valid_positions(outputs)  # [B, T]
    per_image_valid = [int(v) for v in valid.sum(1).tolist()]
    n = [int(t["boxes"].shape[0]) for t in targets]
    pos = [min(Q, k) for k in n]
    pos_tokens = 0
    for i, t in enumerate(targets):
        pm = t["positive_map"][..., :T] > 0
        pos_tokens += int((pm & valid[i, : pm.shape[-1]]).sum())
    num_pos = sum(pos)
    return {"batch_size": B, "num_queries": Q, "num_boxes": sum(n), "num_pos": num_pos,
            "num_neg": B * Q - num_pos, "num_valid_logits": Q * sum(per_image_valid),
            "num_matched_valid_logits": sum(p * v for p, v in zip(pos, per_image_valid)),
            "num_positive_tokens": pos_tokens}


def candidates(c: Mapping[str, float]) -> list[tuple[str, float]]:
    """(expression, value) of the normalizers public criteria use, each clamped to >= 1 as they clamp."""
    raw = [
        ("num_pos", c["num_pos"]),  # matched queries: MMDetection, Open-GroundingDino
        ("num_boxes", c["num_boxes"]),  # target boxes: transformers, DETR, DINO
        ("batch_size", c["batch_size"]),  # a per-image mean
        ("num_queries", c["num_queries"]),
        ("batch_size * num_queries", c["batch_size"] * c["num_queries"]),
        ("num_pos + 0.1 * num_neg", c["num_pos"] + 0.1 * c["num_neg"]),  # DETR's eos_coef weighted mean
        ("num_valid_logits", c["num_valid_logits"]),  # a mean over masked_select
        ("num_matched_valid_logits", c["num_matched_valid_logits"]),
        ("num_positive_tokens", c["num_positive_tokens"]),
        ("1 (a plain sum)", 1.0),
    ]
    return [(name, max(float(v), 1.0)) for name, v in raw]


def reference_normalizer(preset: Any, term: str, c: Mapping[str, float]) -> tuple[str, float] | None:
    """The normalizer the reference of `preset` divides `term` by, as (expression, value)."""
    base = next((b for b in CLS_TERMS + BOX_TERMS if term == b or term.startswith(b + "_")), None)
    if base is None:
        return None
    name = "num_pos" if base in CLS_TERMS and preset.cls_normalizer == "matched_queries" else "num_boxes"
    return name, max(float(c[name]), 1.0)


def explain(term: str, got: float, ref: float, preset: Any, c: Mapping[str, float]) -> tuple[str, str] | None:
    """(normalizer expression, its value text) when after / reference is exactly a change of normalizer."""
    refn = reference_normalizer(preset, term, c)
    if refn is None or not (got == got and ref == ref) or ref == 0 or got == 0:
        return None
    ratio = got / ref
    names = [name for name, value in candidates(c)
             if abs(value - refn[1]) > NORMALIZER_RTOL * refn[1]
             and abs(ratio - refn[1] / value) <= NORMALIZER_RTOL * abs(refn[1] / value)]
    if not names:
        return None
    value = dict(candidates(c))[names[0]]
    return " = ".join(names), f"{value:g} instead of {refn[0]} = {refn[1]:g}"


def compare_presets(after: Mapping[str, float], outputs: Mapping[str, Any],
                    targets: Sequence[Mapping[str, Tensor]], preset: str) -> Check:
    """Check 4 (see the module docstring). Passes when after equals the `preset` reference."""
    from nanscope.criterion.presets import PRESETS
    from nanscope.criterion.set_criterion import SetCriterion
    from nanscope.verify.checks import RTOL, canonical, compare_terms, floats

    refs: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name in PRESETS:
            refs[name] = floats(SetCriterion(name, impl="masked_select")(outputs, targets))
    cmps = {name: compare_terms(after, ref) for name, ref in refs.items()}

    def distance(name: str) -> tuple[Any, ...]:
        cm = cmps[name]
        return (not cm["equal"], len(cm["mismatched"]) + len(cm["missing"]), cm["max_rel_diff"], name != preset)

    closest = min(PRESETS, key=distance)
    counts = batch_counts(outputs, targets)
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
    detail = (f"vs SetCriterion(preset={preset!r}, impl='masked_select'): max rel. diff {cm['max_rel_diff']:.2g} "
              f"over {cm['compared']} terms (tolerance {RTOL:g}); every preset: {'; '.join(one(n) for n in PRESETS)}; "
              f"closest: {closest}")
    if reasons:
        detail += f"; vs {closest}: " + "; ".join(reasons)
    if unexplained:
        detail += ("; not explained by a normalizer: " + ", ".join(
            f"{k} {got[k]:.6g} vs {refs[closest][k]:.6g}" for k in unexplained[:4]))
    if cmps[closest]["equal"] and closest != preset:
        why_short = f"it equals the {closest} reference instead (pass --preset {closest})"
        detail += f". After equals the {closest} reference: pass --preset {closest}"
    elif reasons:
        why_short = "; ".join(reasons)
    elif cm["equal"]:
        why_short = ""
    else:
        bad = cmps[closest]["mismatched"] + cmps[closest]["missing"]
        why_short = f"{len(bad)} terms ({', '.join(bad[:4])}) not explained by a normalizer"
    numbers = {**cm, "reference": refs[preset], "presets": {n: {k: cmps[n][k] for k in
               ("equal", "max_rel_diff", "mismatched", "missing", "compared")} for n in PRESETS},
               "closest": closest, "normalizers": {expr: terms for (expr, _), terms in groups.items()},
               "counts": counts, "why": why_short}
    return Check(4, "after equals the masked_select reference", cm["equal"], detail, numbers)
