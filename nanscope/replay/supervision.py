"""Measure what a finite loss supervises: gradient coverage, pushed-up logits, counterfactual targets.

Once the NaN is gone, a criterion can still train the wrong thing. These probes run the user's
criterion on the captured outputs and measure, never guess from its source:

- which (image, query) rows of each layer's logits receive a non-zero gradient from each term
  (a loss over matched queries only never teaches the other queries "no object");
- whether any logit is pushed up (negative gradient), at the real logits and with every finite logit at 0
  (a saturated positive has no gradient at the real ones): a classification term that pushes every
  logit down while the batch has positive tokens trains every query towards "no object";
- whether the term changes at all when every positive map is zeroed (the same blindness, by counterfactual);
- what the user's matcher does with a box whose class cost is undefined (an empty positive-map row)
  or with non-finite costs: a matcher that maps NaN to 0 or to the largest float matches such a box to
  an arbitrary query instead of raising;
- whether one weighted term drowns the others (`nanscope.replay.loss_scale`).

Everything runs on detached leaf copies of the logits: the model is not re-run and nothing it holds changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from nanscope.replay.loss_scale import SCALE_RATIO, batch_counts, drowning_terms, explain_normalizer, reference_terms
from nanscope.terms import canonical, loss_term_names

Outputs = Mapping[str, Any]
Targets = Sequence[Mapping[str, Any]]
RunCriterion = Callable[[Outputs, Targets], Mapping[str, Tensor]]
MatcherCall = Callable[[Outputs, Targets], Sequence[tuple[Any, Any]]]

UNCHANGED_RTOL = 1e-6  # a term within this relative distance after zeroing the positives did not use them


@dataclass(frozen=True)
class TermGradient:
    """Where the gradient of one loss term lands on the logits."""

    term: str
    layer: str  # the layer whose logits carry most of the term's gradient ('dec5', 'enc', ...)
    rows_total: int  # B * Q of that layer
    rows_reached: int  # (image, query) rows with any non-zero gradient
    rows_per_image: tuple[int, ...]
    pushed_up: int  # logits with a negative gradient (a descent step raises them): positives being learned
    cells_reached: int  # logits with a non-zero gradient
    value: float
    unchanged_without_positives: bool | None = None  # None: not measured
    # the same count with every finite logit set to 0 (p = 0.5): a saturated positive (p ~ 1 on a random or
    # overflowing model) has no gradient at the real logits, but a term that learns positives pushes it up here
    pushed_up_neutral: int | None = None  # None: not measured

    @property
    def share(self) -> float:
        return self.rows_reached / max(self.rows_total, 1)


@dataclass(frozen=True)
class HiddenMatch:
    """A box the user's matcher matched although its matching cost is undefined or non-finite."""

    image: int
    box: int
    query: int  # the query the user's matcher gave it
    why: str  # 'empty positive-map row' or 'non-finite logits' / 'non-finite boxes'
    guarded_query: int | None  # what nanscope's guarded matcher gives it (None: it refuses the image)


@dataclass
class SupervisionProbe:
    """The measurements of one criterion on one replayed batch."""

    criterion: str
    gradients: list[TermGradient] = field(default_factory=list)
    weighted: dict[str, float] = field(default_factory=dict)  # term -> weight * value (loss terms only)
    hidden_matches: list[HiddenMatch] = field(default_factory=list)
    matcher_raised: str | None = None  # the matcher refused the batch (that is the safe behaviour)
    positives_in_batch: int = 0  # boxes with at least one kept token
    scale: list[tuple[str, str, float, str | None]] = field(default_factory=list)  # (term, next, ratio, normalizer)
    notes: list[str] = field(default_factory=list)


def _leaf_layers(outputs: Outputs, *, neutral: bool = False) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A copy of DETR outputs whose logits are fresh leaves requiring grad; returns (outputs, {layer: leaf}).
    `neutral`: every finite logit is 0 (the -inf of masked and padded positions kept)."""
    leaves: dict[str, Tensor] = {}

    def leaf(name: str, d: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(d)
        lg = d["pred_logits"].detach().clone()
        if neutral:
            lg = torch.where(torch.isfinite(lg), torch.zeros_like(lg), lg)
        lg.requires_grad_(True)
        leaves[name] = lg
        d["pred_logits"] = lg
        if isinstance(d.get("pred_boxes"), Tensor):
            d["pred_boxes"] = d["pred_boxes"].detach().clone()
        return d

    aux = list(outputs.get("aux_outputs") or [])
    n = len(aux)
    out = leaf(f"dec{n}", outputs)
    out["aux_outputs"] = [leaf(f"dec{i}", a) for i, a in enumerate(aux)]
    if isinstance(outputs.get("enc_outputs"), Mapping):
        out["enc_outputs"] = leaf("enc", outputs["enc_outputs"])
    return out, leaves


def zero_positives(targets: Targets) -> list[dict[str, Any]]:
    """Targets with every positive map (and its common aliases, and the transformers stack's `phrase_map`
    whose rows its `class_labels` index) set to 0; boxes and labels unchanged."""
    out = []
    for t in targets:
        d = dict(t)
        for k in ("positive_map", "token_labels", "positive_maps", "phrase_map"):
            if isinstance(d.get(k), Tensor):
                d[k] = torch.zeros_like(d[k])
        out.append(d)
    return out


def gradient_coverage(run: RunCriterion, outputs: Outputs, targets: Targets, *,
                      weight_dict: Mapping[str, float] | None = None,
                      counterfactual: bool = True) -> tuple[list[TermGradient], dict[str, float]]:
    """Per classification term: where its gradient lands on the logits. Terms with no logit gradient
    (box terms) and non-finite terms (NS001 reports them) are left out.

    Returns (gradients, {term: weight * value} of every finite loss term).
    """
    leaf_outputs, leaves = _leaf_layers(outputs)
    names = list(leaves)
    with torch.enable_grad():
        terms = dict(run(leaf_outputs, targets))
    loss_terms = loss_term_names(terms, weight_dict)
    weighted: dict[str, float] = {}
    for k in loss_terms:
        v = float(terms[k].detach().float().sum())
        if math.isfinite(v):
            weighted[k] = v * (float(weight_dict[k]) if isinstance(weight_dict, Mapping) and k in weight_dict else 1.0)
    results: list[TermGradient] = []
    cls_terms: list[str] = []
    for k in loss_terms:
        t = terms[k]
        if not t.requires_grad or not k in weighted:
            continue
        grads = torch.autograd.grad(t.sum(), [leaves[n] for n in names], retain_graph=True, allow_unused=True)
        mass = [float(g.abs().sum()) if g is not None else 0.0 for g in grads]
        if not any(m > 0 for m in mass):
            continue  # no gradient reaches the logits: a box term
        j = max(range(len(names)), key=lambda i: mass[i])
        g = grads[j]
        assert g is not None
        g = torch.nan_to_num(g, nan=0.0)
        rows = (g != 0).any(-1)  # [B, Q]
        results.append(TermGradient(
            term=k, layer=names[j], rows_total=int(rows.numel()), rows_reached=int(rows.sum()),
            rows_per_image=tuple(int(x) for x in rows.sum(1).tolist()), pushed_up=int((g < 0).sum()),
            cells_reached=int((g != 0).sum()), value=float(t.detach().float().sum())))
        cls_terms.append(k)
    if any(tg.pushed_up == 0 for tg in results):  # only these can be NS402's: measure them at neutral logits
        results = _pushed_up_at_neutral_logits(run, outputs, targets, results)
    if counterfactual and cls_terms:
        with torch.no_grad():
            try:
                zeroed = dict(run(leaf_outputs, zero_positives(targets)))
            except Exception:  # the criterion cannot run without positives: it uses them
                zeroed = {}
        for i, tg in enumerate(results):
            z = zeroed.get(tg.term)
            if isinstance(z, Tensor):
                zv = float(z.detach().float().sum())
                same = math.isfinite(zv) and abs(zv - tg.value) <= UNCHANGED_RTOL * max(abs(tg.value), 1e-12)
                results[i] = TermGradient(**{**tg.__dict__, "unchanged_without_positives": same})
    return results, weighted


def _pushed_up_at_neutral_logits(run: RunCriterion, outputs: Outputs, targets: Targets,
                                 results: list[TermGradient]) -> list[TermGradient]:
    """`pushed_up_neutral` of each term that pushes no logit up at the real logits: its gradient on its
    layer's logits with all finite ones set to 0 (the others keep None: not needed)."""
    neutral_outputs, leaves = _leaf_layers(outputs, neutral=True)
    try:
        with torch.enable_grad():
            terms = dict(run(neutral_outputs, targets))
    except Exception:  # the criterion cannot run on neutral logits: keep the measurement at the real ones
        return results
    out = []
    for tg in results:
        t, leaf = terms.get(tg.term), leaves.get(tg.layer)
        up = None
        if tg.pushed_up == 0 and isinstance(t, Tensor) and t.requires_grad and leaf is not None:
            (g,) = torch.autograd.grad(t.sum(), [leaf], retain_graph=True, allow_unused=True)
            up = 0 if g is None else int((torch.nan_to_num(g, nan=0.0) < 0).sum())
        out.append(TermGradient(**{**tg.__dict__, "pushed_up_neutral": up}))
    return out


def hidden_matches(matcher: MatcherCall, outputs: Outputs, targets: Targets, *, empty_rows: Sequence[tuple[int, int]],
                   nonfinite_images: Sequence[int], preset: str = "open-groundingdino") -> tuple[list[HiddenMatch], str | None]:
    """What `matcher` does with boxes whose matching cost is undefined.

    empty_rows: (image, box) pairs whose positive-map row has no kept token (0/0 in a row-normalizing
    class cost); nonfinite_images: images whose logits or boxes are non-finite. Returns the matches the
    matcher made for them without raising, and the matcher's error message when it refused (the safe way).
    """
    if not empty_rows and not nonfinite_images:
        return [], None
    try:
        with torch.no_grad():
            matches = list(matcher(outputs, targets))
    except Exception as exc:  # refusing is right: nanscope's other findings explain why
        return [], f"{type(exc).__name__}: {str(exc)[:200]}"
    found: list[HiddenMatch] = []
    by_image: dict[int, list[int]] = {}
    for image, box in empty_rows:
        by_image.setdefault(image, []).append(box)
    for image, boxes in sorted(by_image.items()):
        for box in sorted(arbitrary_boxes(matcher, outputs, targets, matches, image, boxes)):
            q = _query_of(matches, image, box)
            if q is not None:
                guarded = _guarded_queries(outputs, targets, preset, image)
                found.append(HiddenMatch(image, box, q, "empty positive-map row", guarded.get((image, box))))
    for image in nonfinite_images:
        n = int(targets[image]["boxes"].shape[0])
        why = ("non-finite logits" if not bool(torch.isfinite(outputs["pred_logits"][image]).all())
               else "non-finite boxes")
        for box in range(n):
            q = _query_of(matches, image, box)
            if q is not None and (image, box) not in empty_rows:
                found.append(HiddenMatch(image, box, q, why, None))
    return found, None


PERMUTATION_SEEDS = (0, 1)  # two query orders: a sane match survives both, an arbitrary one rarely does


def _permuted(outputs: Outputs, perm: Tensor) -> dict[str, Any]:
    """`outputs` with the queries of every image reordered by `perm` (new query k is old query perm[k])."""
    out = dict(outputs)
    for k in ("pred_logits", "pred_boxes"):
        out[k] = outputs[k][:, perm.to(outputs[k].device)]
    return out


def arbitrary_boxes(matcher: MatcherCall, outputs: Outputs, targets: Targets, matches: Sequence[tuple[Any, Any]],
                    image: int, boxes: Sequence[int]) -> set[int]:
    """The boxes of `image`, among `boxes`, whose query the matcher picks arbitrarily.

    A matching cost that depends on the queries is equivariant: reorder the queries and every box follows
    its query. A box whose costs were made constant (NaN -> 0, or -> the largest float) does not: it
    takes whichever free query comes first. Only conclusive when every other box of the image follows.
    """
    q = int(outputs["pred_logits"].shape[1])
    others = [j for j in range(int(targets[image]["boxes"].shape[0])) if j not in boxes]
    suspects = set(boxes)
    for seed in PERMUTATION_SEEDS:
        perm = torch.randperm(q, generator=torch.Generator().manual_seed(seed))
        try:
            with torch.no_grad():
                again = list(matcher(_permuted(outputs, perm), targets))
        except Exception:
            return set()
        def follows(j: int) -> bool:
            before, after = _query_of(matches, image, j), _query_of(again, image, j)
            return before is not None and after is not None and int(perm[after]) == before
        if not all(follows(j) for j in others):
            return set()  # this matcher is not equivariant at all: nothing to conclude
        suspects = {j for j in suspects if not follows(j)}
    return suspects


def _query_of(matches: Sequence[tuple[Any, Any]], image: int, box: int) -> int | None:
    if image >= len(matches):
        return None
    rows, cols = (torch.as_tensor(x).reshape(-1) for x in matches[image])
    hit = (cols == box).nonzero()
    return int(rows[hit[0, 0]]) if hit.numel() else None


def _guarded_queries(outputs: Outputs, targets: Targets, preset: str, image: int) -> dict[tuple[int, int], int]:
    """nanscope's guarded matcher on one image (an empty row's class cost is clamped to 0, so the box is
    matched by its box costs); {} when it refuses the image (non-finite logits or boxes)."""
    from nanscope.criterion.matcher import HungarianMatcher
    from nanscope.errors import MatchingError

    one = {k: v[image: image + 1] for k, v in outputs.items() if isinstance(v, Tensor)}
    try:
        rows, cols = HungarianMatcher(preset)(one, [targets[image]])[0]
    except MatchingError:
        return {}
    return {(image, int(c)): int(r) for r, c in zip(rows.tolist(), cols.tolist())}


# ---------------------------------------------------------------- loss scale

# ---------------------------------------------------------------- everything, for one criterion


def probe_supervision(run: RunCriterion, name: str, outputs: Outputs, targets: Targets, texts: Sequence[Any], *,
                      weight_dict: Mapping[str, float] | None = None, matcher: MatcherCall | None = None,
                      nonfinite_images: Sequence[int] = ()) -> SupervisionProbe:
    """Run every supervision measurement of criterion `name` on one replayed batch.

    texts: per image, nanscope's `TextInfo` (which boxes have kept tokens); nonfinite_images: images
    whose logits or boxes hold NaN/inf (from the capture).
    """
    probe = SupervisionProbe(criterion=name)
    probe.positives_in_batch = sum(1 for info in texts for b in info.boxes if b.kept)
    probe.gradients, probe.weighted = gradient_coverage(run, outputs, targets, weight_dict=weight_dict)
    if matcher is not None:
        empty = [(i, b.box) for i, info in enumerate(texts) for b in info.boxes if not b.kept]
        probe.hidden_matches, probe.matcher_raised = hidden_matches(matcher, outputs, targets, empty_rows=empty,
                                                                     nonfinite_images=nonfinite_images)
    finite = probe.weighted and all(math.isfinite(v) for v in probe.weighted.values())
    if finite and not nonfinite_images:
        n_layers = len(outputs.get("aux_outputs") or []) + 1
        drowning = drowning_terms(probe.weighted, f"dec{n_layers - 1}")
        references = reference_terms(outputs, targets) if drowning else {}  # only then: 3 criterion runs
        counts = batch_counts(outputs, targets)
        for top, nxt, ratio in drowning:
            # nanscope's reference spells terms its way ('_enc' for Open-GroundingDino's '_interm', ...)
            ctop, cnxt = canonical(top), canonical(nxt)
            ref_ratios = [ref[ctop] / ref[cnxt] for ref, _ in references.values()
                          if ctop in ref and cnxt in ref and ref[cnxt] > 0]
            if ref_ratios and ratio < SCALE_RATIO * min(ref_ratios):
                continue  # nanscope's reference is as unbalanced on this batch: the model, not the loss
            why = None
            if top.startswith("loss_ce") and "mmdet" in references:
                ref, unnormalized = references["mmdet"]
                w = float(weight_dict[top]) if isinstance(weight_dict, Mapping) and top in weight_dict else 1.0
                fit = explain_normalizer(probe.weighted[top] / w, unnormalized.get(ctop, math.nan), counts)
                why = fit[0] if fit else None
            probe.scale.append((top, nxt, ratio, why))
    return probe
