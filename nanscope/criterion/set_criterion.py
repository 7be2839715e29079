"""The fixed GroundingDINO set criterion: focal loss on valid text positions only, L1 + GIoU on matches.

Criterion presets

| preset | cls weight | cls normalizer | match class cost | match weights (class, L1, GIoU) | box weights (L1, GIoU) | layers |
|---|---|---|---|---|---|---|
| `mmdet` | 1.0 | matched queries, averaged over ranks | focal-BCE summed over valid tokens, eps 1e-12 | 2.0, 5.0, 2.0 | 5.0, 2.0 | last + aux + enc |
| `open-groundingdino` | 2.0 | matched queries, local | (pos - neg) @ normalized positive row, eps 1e-8 | 1.0, 5.0, 2.0 | 5.0, 2.0 | last + aux + enc |
| `hf` | 2.0 | GT boxes, averaged over ranks | (pos - neg) @ normalized positive row, eps 1e-8 | 1.0, 5.0, 2.0 | 5.0, 2.0 | last + enc |

All presets: focal alpha 0.25, gamma 2; class targets are the binarized positive-map rows of the
matched boxes; box terms are normalized by the number of GT boxes (averaged over ranks), at least 1.

`SetCriterion(outputs, targets)` returns the unweighted terms `loss_ce`, `loss_bbox`, `loss_giou`
(last decoder layer), the same with `_0`, `_1`, ... for `aux_outputs` and `_enc` for `enc_outputs`;
`criterion.weight_dict[name]` gives each weight and `criterion.total(losses)` the weighted sum.

Implementations of the classification term (`impl`), equal to 1e-6 in value and gradient:
"syncfree" (default) sanitizes padded logits with `torch.where` and multiplies by the mask: shapes
never depend on data, no host sync, compiles with `fullgraph=True`; "masked_select" is the
MMDetection / transformers reference. `masked=False` (`NaiveCriterion`) runs the focal loss over
all columns and matches over all columns: it reproduces the NaN of padded `-inf` logits and is
the default "before" of `nanscope verify-fix`.

Normalizers are counts known on the host (number of target boxes, number of matches), turned into
tensors on the logits' device; when torch.distributed is initialized they are all-reduced and
divided by the world size (as the references do) before clamping to >= 1 - no `.item()`. The
Hungarian matching itself needs the costs on the CPU: one device-to-host copy per batch, all
layers together.
Not covered: denoising queries (MMDetection / Open-GroundingDino DN losses).
"""

from __future__ import annotations

from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from nanscope.errors import InputError
from nanscope.criterion.focal import focal_sum_masked_select, focal_sum_naive, focal_sum_syncfree
from nanscope.criterion.matcher import HungarianMatcher, Match, PaddedTargets, matching_costs
from nanscope.criterion.presets import PRESETS, CriterionPreset, get_preset
from nanscope.criterion.text_mask import text_validity
from nanscope.terms import parse

__all__ = ["SetCriterion", "NaiveCriterion", "LossWeights", "PRESETS", "CriterionPreset", "HungarianMatcher",
           "matching_costs", "text_validity", "presets_markdown"]

Impl = Literal["syncfree", "masked_select"]
IMPLS: tuple[str, ...] = ("syncfree", "masked_select")
TERMS: tuple[str, ...] = ("loss_ce", "loss_bbox", "loss_giou")


class LossWeights(Mapping[str, float]):
    """Weights of the loss terms; `weights["loss_ce_3"]` and `weights["loss_bbox_enc"]` resolve to the base term."""

    def __init__(self, base: Mapping[str, float]) -> None:
        self._base = dict(base)

    def __getitem__(self, key: str) -> float:
        if key in self._base:
            return self._base[key]
        term = parse(key)
        if term.layer != "last" and term.base in self._base:
            return self._base[term.base]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)

    def __repr__(self) -> str:
        return f"LossWeights({self._base})"


class SetCriterion(nn.Module):
    """DETR-style set criterion for GroundingDINO outputs (see the module docstring)."""

    def __init__(self, preset: str | CriterionPreset = "mmdet", *, impl: Impl = "syncfree", masked: bool = True,
                 aux_loss: bool | None = None, enc_loss: bool | None = None) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise InputError(f"unknown criterion impl {impl!r}; valid: {', '.join(IMPLS)}")
        self.preset = get_preset(preset)
        self.impl = impl
        self.masked = masked
        self.aux_loss = self.preset.aux_loss if aux_loss is None else aux_loss
        self.enc_loss = self.preset.enc_loss if enc_loss is None else enc_loss
        self.matcher = HungarianMatcher(self.preset, masked=masked)
        self.weight_dict = LossWeights({"loss_ce": self.preset.cls_weight, "loss_bbox": self.preset.bbox_weight,
                                        "loss_giou": self.preset.giou_weight})

    def extra_repr(self) -> str:
        return f"preset={self.preset.name!r}, impl={self.impl!r}, masked={self.masked}"

    def total(self, loss_dict: Mapping[str, Tensor]) -> Tensor:
        """The weighted sum of `loss_dict` (every key must be a known term)."""
        return sum(self.weight_dict[k] * v for k, v in loss_dict.items())  # type: ignore[return-value]

    def layers(self, outputs: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """(suffix, outputs of one layer) pairs that are supervised; aux and enc inherit the text mask."""
        shared = {"text_token_mask": outputs["text_token_mask"]} if "text_token_mask" in outputs else {}
        out = [("", {**shared, "pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]})]
        if self.aux_loss:
            out += [(f"_{i}", {**shared, **aux}) for i, aux in enumerate(outputs.get("aux_outputs") or ())]
        if self.enc_loss and outputs.get("enc_outputs") is not None:
            out.append(("_enc", {**shared, **outputs["enc_outputs"]}))
        return out

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """Compute the unweighted loss terms.

        Args:
            outputs: "pred_logits" [B, Q, T] (-inf at padded text positions), "pred_boxes" [B, Q, 4]
                cxcywh, optional "text_token_mask" [B, L] bool (L <= T), "aux_outputs" (list of dicts
                with pred_logits / pred_boxes), "enc_outputs" (dict).
            targets: B dicts with "boxes" [N, 4] normalized cxcywh and "positive_map" [N, T]
                (binary or row-normalized; binarized with > 0 for the class targets).

        Returns:
            {"loss_ce", "loss_bbox", "loss_giou"} plus `_<i>` / `_enc` variants, 0-dim tensors.

        Raises:
            MatchingError: a matching cost is non-finite (names layer, image, query, box and term).
        """
        _check_outputs(outputs, len(targets))
        device = outputs["pred_logits"].device
        padded = self.matcher.pad(outputs, targets)
        num_boxes = _normalizer(sum(padded.sizes), device, across_ranks=True)
        losses: dict[str, Tensor] = {}
        layers = self.layers(outputs)
        if self.masked:  # read validity from the logits once per layer, for the matcher and the loss
            for _, layer in layers:
                if "text_token_mask" not in layer:
                    layer["text_token_mask"] = text_validity(layer)[0]
        all_indices = self.matcher.match_layers([lo for _, lo in layers], padded,
                                                names=[_layer_name(s) for s, _ in layers])
        for (suffix, layer), indices in zip(layers, all_indices):
            idx = _flat_indices(indices, device)
            if self.preset.cls_normalizer == "num_boxes":
                cls_norm = num_boxes
            else:
                matched = sum(len(q) for q, _ in indices)
                cls_norm = _normalizer(matched, device, across_ranks=self.preset.cls_normalizer_across_ranks)
            losses["loss_ce" + suffix] = self._loss_ce(layer, padded, idx) / cls_norm
            loss_bbox, loss_giou = _box_losses(layer["pred_boxes"], padded, idx)
            losses["loss_bbox" + suffix] = loss_bbox / num_boxes
            losses["loss_giou" + suffix] = loss_giou / num_boxes
        return losses

    def _loss_ce(self, layer: Mapping[str, Any], padded: PaddedTargets, idx: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Sum of the focal loss of one layer over the used text positions (0-dim)."""
        batch, query, box = idx
        width = padded.maps.shape[-1]
        logits = layer["pred_logits"][..., :width]  # [B, Q, W]
        target = torch.zeros_like(logits)
        target[batch, query] = (padded.maps[batch, box] > 0).to(logits.dtype)
        a, g = self.preset.focal_alpha, self.preset.focal_gamma
        if not self.masked:
            return focal_sum_naive(logits, target, alpha=a, gamma=g)
        valid = text_validity(layer)[0][:, None, :width]  # [B, 1, W]
        if self.impl == "syncfree":
            return focal_sum_syncfree(logits, target, valid, alpha=a, gamma=g)
        return focal_sum_masked_select(logits, target, valid, alpha=a, gamma=g)


class NaiveCriterion(SetCriterion):
    """`SetCriterion(masked=False)`: focal loss and matching over all text columns, padded ones included."""

    def __init__(self, preset: str | CriterionPreset = "mmdet", *, aux_loss: bool | None = None,
                 enc_loss: bool | None = None) -> None:
        super().__init__(preset, masked=False, aux_loss=aux_loss, enc_loss=enc_loss)


def presets_markdown() -> str:
    """The "Criterion presets" table of the module docstring, generated from `PRESETS`."""
    lines = ["| preset | cls weight | cls normalizer | match class cost | match weights (class, L1, GIoU) "
             "| box weights (L1, GIoU) | layers |", "|---|---|---|---|---|---|---|"]
    for p in PRESETS.values():
        norm = "matched queries" if p.cls_normalizer == "matched_queries" else "GT boxes"
        norm += ", averaged over ranks" if p.cls_normalizer_across_ranks else ", local"
        cost = ("focal-BCE summed over valid tokens" if p.match_cost == "focal_bce"
                else "(pos - neg) @ normalized positive row")
        layers = "last" + (" + aux" if p.aux_loss else "") + (" + enc" if p.enc_loss else "")
        lines.append(f"| `{p.name}` | {p.cls_weight} | {norm} | {cost}, eps {_eps(p.match_eps)} | "
                     f"{p.match_class_weight}, {p.match_bbox_weight}, {p.match_giou_weight} | "
                     f"{p.bbox_weight}, {p.giou_weight} | {layers} |")
    return "\n".join(lines)


def _eps(x: float) -> str:
    return f"{x:g}".replace("e-0", "e-")


def _layer_name(suffix: str) -> str:
    if not suffix:
        return "last decoder layer"
    return "encoder proposals" if suffix == "_enc" else f"aux decoder layer {suffix[1:]}"


def _check_outputs(outputs: Mapping[str, Any], num_targets: int) -> None:
    for key in ("pred_logits", "pred_boxes"):
        if key not in outputs:
            raise InputError(f"outputs have no {key!r}; expected pred_logits [B, Q, T] and pred_boxes [B, Q, 4]")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.dim() != 3 or boxes.shape != (*logits.shape[:2], 4):
        raise InputError(f"pred_logits {tuple(logits.shape)} and pred_boxes {tuple(boxes.shape)} given; "
                         "expected [B, Q, T] and [B, Q, 4]")
    if logits.shape[0] != num_targets:
        raise InputError(f"{num_targets} targets given for a batch of {logits.shape[0]} images")


def _normalizer(count: int, device: torch.device, *, across_ranks: bool) -> Tensor:
    """`count` as a 0-dim tensor, averaged over ranks when torch.distributed is up, clamped to >= 1."""
    n = torch.full((), float(count), device=device)  # a fill kernel: no host-to-device copy to wait for
    if across_ranks and dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)  # enqueued on the device stream: no host sync
        n = n / dist.get_world_size()
    return n.clamp(min=1.0)


def _flat_indices(indices: Sequence[Match], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(image, query, box) index vectors [M] of all matches, on `device`."""
    batch = np.concatenate([np.full(len(q), i, dtype=np.int64) for i, (q, _) in enumerate(indices)])
    query = np.concatenate([q.numpy() for q, _ in indices])
    box = np.concatenate([b.numpy() for _, b in indices])
    flat = torch.from_numpy(np.stack([batch, query, box])).to(device, non_blocking=True)  # [3, M], one copy
    return flat[0], flat[1], flat[2]


def _box_losses(pred_boxes: Tensor, padded: PaddedTargets, idx: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed L1 and 1 - GIoU over the matched pairs (0-dim each)."""
    batch, query, box = idx
    src = pred_boxes[batch, query]  # [M, 4]
    tgt = padded.boxes[batch, box].to(src.dtype)  # [M, 4]
    l1 = torch.nn.functional.l1_loss(src, tgt, reduction="sum")
    giou = generalized_box_iou(box_convert(src, "cxcywh", "xyxy")[:, None], box_convert(tgt, "cxcywh", "xyxy")[:, None])
    return l1, (1 - giou[:, 0, 0]).sum()
