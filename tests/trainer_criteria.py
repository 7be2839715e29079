"""Criteria and matchers in the shapes public GroundingDINO trainers use, written here from their
documented behaviour (see /work/notes/trainers/patterns.md), for the no-glue tests. Nothing here
imports nanscope: nanscope must run them as they are.

- `OGDStyleCriterion`: forward(outputs, targets, cat_list, caption); rebuilds its positive maps from
  outputs["token"] with caption.find; matches per image with a 3-argument matcher (outputs, targets,
  label_map); writes outputs["one_hot"]; focal loss over masked_select(text_mask) / matched queries;
  terms `_interm` for the encoder; `loss_xy` is a no_grad metric outside weight_dict.
- `TokenCriterion`: DETR-style forward(outputs, targets) reading targets["labels"] and
  ["token_labels"]; built by a factory with required parameters; returns `class_error`; divides
  loss_ce by num_pos + eos_coef * num_neg (DETR's weighted mean) and prints a line per call.
- `NeedsArgs`: a class whose constructor needs arguments; `isinf_mean`: filters -inf and averages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

ALPHA, GAMMA = 0.25, 2.0


def _giou_cost(out_bbox, tgt_bbox):
    return -generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(tgt_bbox, "cxcywh", "xyxy"))


def _focal_costs(logits):
    p = logits.sigmoid()
    neg = (1 - ALPHA) * (p ** GAMMA) * (-(1 - p + 1e-8).log())
    pos = ALPHA * ((1 - p) ** GAMMA) * (-(p + 1e-8).log())
    return pos, neg


class ThreeArgMatcher(nn.Module):
    """Open-GroundingDino's matcher shape: forward(outputs, targets, label_map), one image at a time."""

    def __init__(self, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs, targets, label_map):
        bs, nq = outputs["pred_logits"].shape[:2]
        pos, neg = _focal_costs(outputs["pred_logits"].flatten(0, 1))
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets])
        rows = label_map[tgt_ids.cpu()].to(pos.device)
        cost_class = torch.stack([pos @ (r / r.sum()) - neg @ (r / r.sum()) for r in rows], 1) if len(rows) else \
            torch.zeros(bs * nq, 0, device=pos.device)
        out_bbox = outputs["pred_boxes"].flatten(0, 1)
        c = self.cost_bbox * torch.cdist(out_bbox, tgt_bbox, p=1) + self.cost_class * cost_class \
            + self.cost_giou * _giou_cost(out_bbox, tgt_bbox)
        c = c.view(bs, nq, -1).cpu()
        c[~torch.isfinite(c)] = 0.0
        sizes = [len(t["boxes"]) for t in targets]
        idx = [linear_sum_assignment(m[i]) for i, m in enumerate(c.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in idx]


def rebuild_positive_map(encoding, names, caption, width):
    """One row per category name: the tokens of its first occurrence in the caption (caption.find)."""
    out = torch.zeros(len(names), width)
    for k, name in enumerate(names):
        beg = caption.find(name)
        if beg < 0:
            continue
        end = beg + len(name) - 1
        b, e = encoding.char_to_token(beg), encoding.char_to_token(end)
        if e is None:
            e = encoding.char_to_token(end - 1)
        if b is not None and e is not None and b <= e:
            out[k, b: e + 1] = 1
    return out


class OGDStyleCriterion(nn.Module):
    def __init__(self, matcher, weight_dict, focal_alpha, focal_gamma, losses, masked=True):
        super().__init__()
        self.matcher, self.weight_dict, self.losses = matcher, weight_dict, losses
        self.focal_alpha, self.focal_gamma, self.masked = focal_alpha, focal_gamma, masked

    def _one_hot(self, layer, targets, maps):
        indices = []
        for j in range(len(targets)):
            one = {"pred_logits": layer["pred_logits"][j:j + 1], "pred_boxes": layer["pred_boxes"][j:j + 1]}
            indices.extend(self.matcher(one, [targets[j]], maps[j]))
        one_hot = torch.zeros(layer["pred_logits"].shape, dtype=torch.int64)
        for i, (q, b) in enumerate(indices):
            one_hot[i, q] = maps[i][targets[i]["labels"].cpu()[b]].to(torch.long)
        return one_hot, indices

    def _terms(self, layer, targets, indices, one_hot, text_mask, num_boxes):
        logits = layer["pred_logits"]
        tgt = one_hot.to(logits.device)
        if self.masked:
            keep = text_mask[:, None, :].expand_as(logits)
            logits, tgt = torch.masked_select(logits, keep), torch.masked_select(tgt, keep)
        loss = sigmoid_focal_loss(logits, tgt.float(), alpha=self.focal_alpha, gamma=self.focal_gamma,
                                  reduction="sum") / max(sum(len(q) for q, _ in indices), 1)
        bi = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
        qi = torch.cat([q for q, _ in indices])
        src = layer["pred_boxes"][bi, qi]
        dst = torch.cat([t["boxes"][b] for t, (_, b) in zip(targets, indices)])
        l1 = F.l1_loss(src, dst, reduction="none")
        giou = 1 - torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(dst, "cxcywh", "xyxy")))
        out = {"loss_ce": loss, "loss_bbox": l1.sum() / num_boxes, "loss_giou": giou.sum() / num_boxes}
        with torch.no_grad():
            out["loss_xy"] = l1[..., :2].sum() / num_boxes
        return out

    def forward(self, outputs, targets, cat_list, caption, return_indices=False):
        token = outputs["token"]
        width = outputs["pred_logits"].shape[-1]
        maps = [rebuild_positive_map(token[j], cat_list[j], caption[j], width) for j in range(len(cat_list))]
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses = {}
        layers = [("", outputs)] + [(f"_{i}", a) for i, a in enumerate(outputs.get("aux_outputs") or [])]
        if "interm_outputs" in outputs:
            layers.append(("_interm", outputs["interm_outputs"]))
        for suffix, layer in layers:
            one_hot, indices = self._one_hot(layer, targets, maps)
            layer["one_hot"] = one_hot  # Open-GroundingDino writes into the outputs
            layer["text_mask"] = outputs["text_mask"]
            for k, v in self._terms(layer, targets, indices, one_hot, outputs["text_mask"], num_boxes).items():
                losses[k + suffix] = v
        return losses


def _ogd_weights():
    base = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    weights = dict(base)
    for i in range(6):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    weights.update({f"{k}_interm": v for k, v in base.items()})
    return weights


def build_open_gdino(masked=True):
    """A factory with no required parameter, as the no-argument form of MODULE:ATTR calls it."""
    return OGDStyleCriterion(ThreeArgMatcher(), _ogd_weights(), ALPHA, GAMMA, ["labels", "boxes"], masked=masked)


class TokenMatcher(nn.Module):
    """DETR-style matcher(outputs, targets) on targets["labels"], ["boxes"] and ["token_labels"]."""

    @torch.no_grad()
    def forward(self, outputs, targets):
        bs, nq = outputs["pred_logits"].shape[:2]
        pos, neg = _focal_costs(outputs["pred_logits"].flatten(0, 1))
        out_bbox = outputs["pred_boxes"].flatten(0, 1)
        rows = torch.cat([t["token_labels"] for t in targets]).float()
        assert len(torch.cat([t["labels"] for t in targets])) == len(rows)
        rows = rows / rows.sum(-1, keepdim=True).clamp(min=1e-6)
        tgt_bbox = torch.cat([t["boxes"] for t in targets])
        c = 5.0 * torch.cdist(out_bbox, tgt_bbox, p=1) + (pos @ rows.T - neg @ rows.T) \
            + 2.0 * _giou_cost(out_bbox, tgt_bbox)
        c = c.view(bs, nq, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        idx = [linear_sum_assignment(m[i]) for i, m in enumerate(c.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in idx]


class TokenCriterion(nn.Module):
    def __init__(self, num_classes, matcher, weight_dict, eos_coef=0.1):
        super().__init__()
        self.num_classes, self.matcher, self.weight_dict, self.eos_coef = num_classes, matcher, weight_dict, eos_coef

    def forward(self, outputs, targets):
        indices = self.matcher(outputs, targets)
        logits = outputs["pred_logits"]
        bsz, nq, width = logits.shape
        target = torch.zeros_like(logits)
        for i, (t, (q, b)) in enumerate(zip(targets, indices)):
            target[i, q] = (t["token_labels"][b][:, :width] > 0).to(logits.dtype)
        valid = outputs["text_mask"][:, None, :].expand_as(logits)
        num_pos = sum(len(q) for q, _ in indices)
        norm = num_pos + self.eos_coef * (bsz * nq - num_pos)  # DETR's eos_coef-weighted mean
        loss_ce = sigmoid_focal_loss(logits[valid], target[valid], alpha=ALPHA, gamma=GAMMA, reduction="sum") / norm
        bi = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
        qi = torch.cat([q for q, _ in indices])
        src = outputs["pred_boxes"][bi, qi]
        dst = torch.cat([t["boxes"][b] for t, (_, b) in zip(targets, indices)])
        n = max(sum(len(t["labels"]) for t in targets), 1)
        out = {"loss_ce": loss_ce, "loss_bbox": F.l1_loss(src, dst, reduction="sum") / n,
               "loss_giou": (1 - torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"),
                                                                box_convert(dst, "cxcywh", "xyxy")))).sum() / n}
        with torch.no_grad():
            hit = logits[bi, qi].argmax(-1) == torch.cat([t["token_labels"][b] for t, (_, b) in
                                                         zip(targets, indices)]).argmax(-1)
            out["class_error"] = 100 - hit.float().mean() * 100
        print(f"TokenCriterion: loss_ce={float(loss_ce):.4f} over {num_pos} matches")
        return out


def build_token_criterion(num_classes, eos_coef=0.1):
    """A factory with a required parameter (`MODULE:build_token_criterion(num_classes=2)`)."""
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    return TokenCriterion(num_classes, TokenMatcher(), weights, eos_coef=eos_coef)


class NeedsArgs:
    def __init__(self, num_classes, matcher):  # no defaults: `MODULE:NeedsArgs` alone cannot build it
        self.num_classes, self.matcher = num_classes, matcher

    def __call__(self, outputs, targets):
        return {}


def reads_size(outputs, targets):
    """Reads a key nanscope does not provide (a trainer's pixel-size target)."""
    h, w = targets[0]["size"]
    return {"loss": outputs["pred_boxes"].sum() * 0 + h}


def isinf_mean(outputs, targets):
    """Drops -inf positions with isinf and averages the rest: finite, and not a sum (check 5's stand-ins
    would add zeros to its mean)."""
    logits = outputs["pred_logits"]
    target = torch.zeros_like(logits)
    for i, t in enumerate(targets):
        n = t["positive_map"].shape[0]
        target[i, :n] = (t["positive_map"][:, : logits.shape[-1]] > 0).to(logits.dtype)
    keep = ~torch.isinf(logits)
    return {"loss_ce": sigmoid_focal_loss(logits[keep], target[keep], reduction="mean")}
