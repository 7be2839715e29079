"""NS404's measurements: a weighted loss term that drowns the others of its layer, and the normalizer
(a batch count) that explains its scale. Split from `nanscope.replay.supervision`, which runs them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanscope.terms import term_layer

Outputs = Mapping[str, Any]
Targets = Sequence[Mapping[str, Any]]

SCALE_RATIO = 100.0  # one weighted term this many times the next one of its layer drowns the others
EXPLAIN_RTOL = 0.01  # an implied normalizer within 1% of a candidate explains the term's scale


@dataclass(frozen=True)
class BatchCounts:
    """Counts a classification normalizer can be built from, for one batch and layer."""

    images: int
    queries: int  # B * Q
    boxes: int  # GT boxes
    matched: int  # matched queries (min(Q, N) per image)
    valid: int  # valid logits: sum over images of Q * valid tokens
    positive: int  # positive logits: the matched queries' positive tokens

    def candidates(self) -> dict[str, float]:
        q = self.queries / max(self.images, 1)
        neg = self.valid - self.positive
        return {
            "matched queries": self.matched, "GT boxes": self.boxes, "images": self.images,
            "queries": self.queries, "valid positions": self.valid, "valid positions / queries per image": self.valid / q,
            "positive positions": self.positive, "num_pos + 0.1 * num_neg": self.positive + 0.1 * neg,
            # DETR's eos_coef-weighted mean over queries: matched weigh 1, the others eos_coef = 0.1
            "matched queries + 0.1 * unmatched queries": self.matched + 0.1 * (self.queries - self.matched),
            "1 (a plain sum)": 1.0,
        }


def batch_counts(outputs: Outputs, targets: Targets) -> BatchCounts:
    from nanscope.criterion.text_mask import text_validity

    lg = outputs["pred_logits"]
    b, q = int(lg.shape[0]), int(lg.shape[1])
    valid = text_validity(outputs)[0]  # [B, W]
    sizes = [int(t["boxes"].shape[0]) for t in targets]
    pos = 0
    for i, t in enumerate(targets):
        pm = t["positive_map"][:, : valid.shape[1]] > 0
        pos += int((pm & valid[i][None, : pm.shape[1]]).sum())
    return BatchCounts(images=b, queries=b * q, boxes=sum(sizes), matched=sum(min(q, n) for n in sizes),
                       valid=int(valid.sum()) * q, positive=pos)


def explain_normalizer(value: float, unnormalized: float, counts: BatchCounts) -> tuple[str, float] | None:
    """The candidate normalizer N with `unnormalized / N == value` (to 1%), as (name, N); None when none fits."""
    if not (math.isfinite(value) and value > 0 and math.isfinite(unnormalized) and unnormalized > 0):
        return None
    implied = unnormalized / value
    best = min(counts.candidates().items(), key=lambda kv: abs(kv[1] - implied) / max(kv[1], 1e-12))
    return best if abs(best[1] - implied) <= EXPLAIN_RTOL * max(best[1], 1e-12) else None


def drowning_terms(weighted: Mapping[str, float], last_layer: str) -> list[tuple[str, str, float]]:
    """(term, the next term of its layer, ratio) for every weighted term >= SCALE_RATIO x the next one."""
    groups: dict[str, list[tuple[str, float]]] = {}
    for k, v in weighted.items():
        groups.setdefault(term_layer(k, last_layer), []).append((k, abs(v)))
    out = []
    for items in groups.values():
        if len(items) < 2:
            continue
        items.sort(key=lambda kv: -kv[1])
        (top, a), (nxt, b) = items[0], items[1]
        if b > 0 and a / b >= SCALE_RATIO:
            out.append((top, nxt, a / b))
    return out


def reference_terms(outputs: Outputs, targets: Targets) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Per preset: nanscope's weighted terms on this batch, and the focal classification sums before any
    normalizer ({loss_ce*: sum}). Presets whose matching fails (non-finite costs) are left out."""
    from nanscope.criterion.presets import PRESETS
    from nanscope.criterion.set_criterion import SetCriterion

    counts = batch_counts(outputs, targets)
    out = {}
    for name in PRESETS:
        crit = SetCriterion(name)
        try:
            with torch.no_grad():
                terms = crit(outputs, targets)
        except Exception:  # non-finite costs: no healthy reference on this batch
            continue
        weighted = {k: float(v) * float(crit.weight_dict[k]) for k, v in terms.items()}
        norm = counts.boxes if crit.preset.cls_normalizer == "num_boxes" else counts.matched
        sums = {k: float(v) * max(norm, 1) for k, v in terms.items() if k.startswith("loss_ce")}
        out[name] = (weighted, sums)
    return out
