"""Hungarian matching of queries to target boxes; costs never reach scipy non-finite.

The class cost uses only valid text positions (see `nanscope.criterion.text_mask`). At a `-inf` column
p = sigmoid(-inf) = 0, so with targets that are 0 there the padded columns add exactly 0 to both
cost kinds: masked and naive matching agree whenever the costs are finite. The risks are elsewhere:
a positive-map row with no positive token (0/0 when a row is normalized: clamped here and reported
as `empty_rows`), and non-finite logits or boxes, which raise `MatchingError` naming the image,
query, box and cost term instead of scipy's opaque "matrix contains invalid numeric entries".

Costs are computed for the whole batch at once ([B, Q, N_max] with padded targets) in float32,
and the combined matrix is moved to the CPU once per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

from nanscope.errors import InputError, MatchingError
from nanscope.criterion.presets import CriterionPreset, get_preset
from nanscope.criterion.text_mask import text_validity, text_width

Match = tuple[Tensor, Tensor]  # (query indices [M] int64, box indices [M] int64), on the CPU
_DUMMY = 0.5  # padded target slots hold the box (0.5, 0.5, 0.5, 0.5), so their costs stay finite


@dataclass(frozen=True)
class PaddedTargets:
    """A batch of targets padded to the largest box count.

    boxes: [B, N_max, 4] cxcywh (padded slots hold a dummy box); maps: [B, N_max, W] positive maps
    as given (padded slots and columns are 0); sizes: the real box count of each image.
    """

    boxes: Tensor
    maps: Tensor
    sizes: tuple[int, ...]


def pad_targets(targets: Sequence[Mapping[str, Any]], width: int, device: torch.device | str) -> PaddedTargets:
    """Stack `targets` ("boxes" [N, 4], "positive_map" [N, K]) into `PaddedTargets` of `width` columns.

    Positive-map columns past `width` are dropped (they fall past the model's text length).
    """
    sizes = []
    for i, t in enumerate(targets):
        boxes, pmap = t.get("boxes"), t.get("positive_map")
        if boxes is None or pmap is None:
            missing = "boxes" if boxes is None else "positive_map"
            raise InputError(f"target {i} has no {missing!r}; expected boxes [N, 4] and positive_map [N, 256]")
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or pmap.dim() != 2 or pmap.shape[0] != boxes.shape[0]:
            raise InputError(
                f"target {i}: boxes {tuple(boxes.shape)} and positive_map {tuple(pmap.shape)} given; "
                "expected [N, 4] and [N, tokens] with the same N"
            )
        sizes.append(int(boxes.shape[0]))
    n_max = max(sizes, default=0)
    # Built on `device` by fills and slice assignments: no host sync for targets already on the device.
    out_boxes = torch.full((len(targets), n_max, 4), _DUMMY, device=device)
    out_maps = torch.zeros(len(targets), n_max, width, device=device)
    for i, t in enumerate(targets):
        n = sizes[i]
        out_boxes[i, :n] = t["boxes"].detach()
        pmap = t["positive_map"].detach()[:, :width]
        out_maps[i, :n, : pmap.shape[1]] = pmap
    return PaddedTargets(out_boxes, out_maps, tuple(sizes))


def class_cost(logits: Tensor, maps: Tensor, valid: Tensor | None, preset: CriterionPreset) -> tuple[Tensor, Tensor]:
    """Unweighted classification matching cost.

    Args:
        logits: [B, Q, W]; maps: [B, N, W] positive maps; valid: [B, W] bool, or None for all columns.

    Returns:
        (cost [B, Q, N] float32, empty_rows [B, N] bool: rows with no positive at a used column)
    """
    x = logits.float()
    hit = maps > 0  # [B, N, W]
    used = maps
    if valid is not None:
        # Invalid columns become -inf (p = 0, so finite costs) and drop out of every target matrix.
        v = valid[:, None, :]
        x = torch.where(v, x, float("-inf"))
        hit, used = hit & v, maps * v
    p = x.sigmoid()
    a, g, eps = preset.focal_alpha, preset.focal_gamma, preset.match_eps
    pos = a * (1 - p) ** g * -(p + eps).log()  # [B, Q, W]
    neg = (1 - a) * p**g * -(1 - p + eps).log()  # [B, Q, W], exactly 0 where p = 0
    if preset.match_cost == "focal_bce":
        gt = hit.float()
        not_gt = 1 - gt if valid is None else (1 - gt) * valid[:, None, :]
        cost = torch.bmm(pos, gt.transpose(1, 2)) + torch.bmm(neg, not_gt.transpose(1, 2))
    else:
        # Rows are normalized over all their columns, as the references do. They divide unguarded,
        # so an empty row gives 0/0 = NaN for every query; the clamp makes it 0 here.
        row_sum = maps.sum(-1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        cost = torch.bmm(pos - neg, (used / row_sum).transpose(1, 2))
    return cost, ~hit.any(-1)


def box_costs(pred_boxes: Tensor, target_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """L1 (cxcywh) and -GIoU costs, [B, Q, 4] x [B, N, 4] -> ([B, Q, N], [B, Q, N]) float32."""
    pred, tgt = pred_boxes.float(), target_boxes.float()
    bbox = torch.cdist(pred, tgt, p=1)
    giou = -generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
    return bbox, giou


def _batched_costs(outputs: Mapping[str, Any], padded: PaddedTargets, preset: CriterionPreset,
                   masked: bool) -> dict[str, Tensor]:
    width = padded.maps.shape[-1]
    logits = outputs["pred_logits"][..., :width]
    valid = text_validity(outputs)[0][:, :width] if masked else None
    cls, empty = class_cost(logits, padded.maps, valid, preset)
    bbox, giou = box_costs(outputs["pred_boxes"], padded.boxes)
    return {"class": cls, "bbox": bbox, "giou": giou, "empty_rows": empty}


def _width(outputs: Mapping[str, Any], masked: bool) -> int:
    return text_width(outputs) if masked else outputs["pred_logits"].shape[-1]


@torch.no_grad()
def matching_costs(outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]], *,
                   preset: str | CriterionPreset = "mmdet", masked: bool = True) -> list[dict[str, Tensor]]:
    """The unweighted matching cost terms, per image, so reports can say which one is non-finite.

    Args:
        outputs: "pred_logits" [B, Q, T], "pred_boxes" [B, Q, 4], optional "text_token_mask" [B, L].
        targets: B dicts with "boxes" [N, 4] cxcywh and "positive_map" [N, T].
        masked: False uses every text column, as the references' matchers without a mask do.

    Returns:
        B dicts {"class": [Q, N], "bbox": [Q, N], "giou": [Q, N], "empty_rows": [N] bool}, float32.
        `empty_rows` marks boxes whose positive-map row has no positive at a valid text position;
        with "normalized_row" presets their class cost is 0 where the references divide 0 by 0.
    """
    p = get_preset(preset)
    padded = pad_targets(targets, _width(outputs, masked), outputs["pred_logits"].device)
    costs = _batched_costs(outputs, padded, p, masked)
    return [{k: v[i, ..., :n] for k, v in costs.items()} for i, n in enumerate(padded.sizes)]


class HungarianMatcher:
    """One-to-one matching of queries to target boxes per image (scipy's linear_sum_assignment).

    cost = w_class * class + w_bbox * L1 + w_giou * (-GIoU), with the weights of `preset` unless given.
    """

    def __init__(self, preset: str | CriterionPreset = "mmdet", *, masked: bool = True,
                 cost_class: float | None = None, cost_bbox: float | None = None,
                 cost_giou: float | None = None) -> None:
        self.preset = get_preset(preset)
        self.masked = masked
        self.cost_class = self.preset.match_class_weight if cost_class is None else cost_class
        self.cost_bbox = self.preset.match_bbox_weight if cost_bbox is None else cost_bbox
        self.cost_giou = self.preset.match_giou_weight if cost_giou is None else cost_giou
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise InputError("matching cost weights are all 0; at least one must be non-zero")

    def pad(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> PaddedTargets:
        """Targets padded for this matcher (reuse them across decoder layers of the same batch)."""
        return pad_targets(targets, _width(outputs, self.masked), outputs["pred_logits"].device)

    def __call__(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]] | PaddedTargets, *,
                 layer: str | None = None) -> list[Match]:
        """Match every image of the batch.

        Args:
            outputs: "pred_logits" [B, Q, T], "pred_boxes" [B, Q, 4], optional "text_token_mask" [B, L].
            targets: B dicts ("boxes" [N, 4], "positive_map" [N, T]) or `PaddedTargets` from `pad`.
            layer: named in the error message when a cost is non-finite.

        Returns:
            B pairs (query indices, box indices), int64 on the CPU, len min(Q, N) each.

        Raises:
            MatchingError: a cost is NaN or infinite (message names image, query, box and term).
        """
        padded = targets if isinstance(targets, PaddedTargets) else self.pad(outputs, targets)
        return self.match_layers([outputs], padded, names=[layer])[0]

    @torch.no_grad()
    def match_layers(self, layers: Sequence[Mapping[str, Any]], padded: PaddedTargets, *,
                     names: Sequence[str | None] | None = None) -> list[list[Match]]:
        """Match several layers' outputs against the same targets with one device-to-host copy.

        Returns one list of B matches per layer; `names` label the layers in error messages.
        """
        names = list(names) if names is not None else [None] * len(layers)
        for outputs in layers:
            if outputs["pred_logits"].shape[0] != len(padded.sizes):
                raise InputError(f"{len(padded.sizes)} targets given for a batch of "
                                 f"{outputs['pred_logits'].shape[0]} images")
        empty = torch.empty(0, dtype=torch.int64)
        todo = [i for i, o in enumerate(layers) if o["pred_logits"].shape[1] > 0 and max(padded.sizes, default=0) > 0]
        terms = {i: _batched_costs(layers[i], padded, self.preset, self.masked) for i in todo}
        weights = (("class", self.cost_class), ("bbox", self.cost_bbox), ("giou", self.cost_giou))
        totals = {i: sum(w * terms[i][k] for k, w in weights if w != 0) for i in todo}  # [B, Q, N_max] each
        flat = torch.cat([totals[i].reshape(-1) for i in todo]).cpu() if todo else torch.empty(0)  # the one copy
        result: list[list[Match]] = [[(empty, empty) for _ in padded.sizes] for _ in layers]
        offset = 0
        for i in todo:
            shape = totals[i].shape
            total = flat[offset: offset + totals[i].numel()].view(shape)
            offset += totals[i].numel()
            for image, n in enumerate(padded.sizes):
                if n == 0:
                    continue
                cost = total[image, :, :n]
                if not bool(torch.isfinite(cost).all()):
                    raise _non_finite(image, cost, terms[i], layers[i], padded, names[i])
                rows, cols = linear_sum_assignment(cost.numpy())
                result[i][image] = (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
        return result


def _non_finite(image: int, cost: Tensor, terms: Mapping[str, Tensor], outputs: Mapping[str, Any],
                padded: PaddedTargets, layer: str | None) -> MatchingError:
    bad = ~torch.isfinite(cost)  # [Q, N]
    query, box = (int(x) for x in bad.nonzero()[0])
    values = {k: float(terms[k][image, query, box]) for k in ("class", "bbox", "giou")}
    culprits = [k for k, v in values.items() if v != v or v in (float("inf"), float("-inf"))]
    pred = [round(float(x), 4) for x in outputs["pred_boxes"][image, query]]
    tgt = [round(float(x), 4) for x in padded.boxes[image, box]]
    if "class" in culprits:
        cause = f"the logits of query {query} are non-finite at a valid text position"
    else:
        cause = "a box is non-finite or degenerate (width or height <= 0)"
    where = f" in layer {layer}" if layer else ""
    err = MatchingError(
        f"non-finite matching cost{where}: image {image}, query {query}, box {box}, "
        f"term {' and '.join(repr(k) for k in culprits) or 'sum'} "
        f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())}; pred box {pred}, target box {tgt}); "
        f"{int(bad.sum())} of {bad.numel()} costs of image {image} are non-finite. "
        f"Likely cause: {cause}. scipy's linear_sum_assignment needs finite costs."
    )
    err.image, err.query, err.box, err.terms, err.layer = image, query, box, tuple(culprits), layer
    return err
