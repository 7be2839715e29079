"""HungarianMatcher and matching_costs: exhaustive search, DETR invariants, references, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version

from nanscope.errors import InputError, MatchingError
from nanscope.criterion.matcher import HungarianMatcher, matching_costs
from nanscope.criterion.presets import PRESETS, get_preset
from nanscope.criterion.text_mask import text_validity

NEG_INF = float("-inf")
# transformers 5.18 (huggingface/transformers#47048) replaces NaN/inf matching costs with the largest float
# before scipy; earlier versions pass them on and scipy raises ValueError.
TRANSFORMERS_NONFINITE_COSTS_TO_MAX = Version(transformers.__version__) >= Version("5.18.0")


def make_batch(seed: int, sizes: list[int], *, queries: int = 7, length: int = 9, width: int = 256,
               lengths: list[int] | None = None) -> tuple[dict, list[dict]]:
    """GroundingDINO-like outputs (-inf past each caption, padded to `width`) and targets."""
    g = torch.Generator().manual_seed(seed)
    batch = len(sizes)
    lengths = lengths or [length - (i % 3) for i in range(batch)]
    mask = torch.zeros(batch, max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    full = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
    logits = (2 * torch.randn(batch, queries, width, generator=g)).masked_fill(~full[:, None, :], NEG_INF)
    boxes = torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.2
    targets = []
    for i, n in enumerate(sizes):
        pmap = torch.zeros(n, width)
        for j in range(n):
            start = int(torch.randint(1, lengths[i] - 1, (1,), generator=g))
            pmap[j, start:start + 2] = 1
        pmap = pmap / (pmap.sum(-1, keepdim=True) + 1e-6)  # groundingdino-style normalized rows
        targets.append({"boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.3, "positive_map": pmap})
    return {"pred_logits": logits, "pred_boxes": boxes, "text_token_mask": mask}, targets


def total_cost(costs: dict, matcher: HungarianMatcher) -> torch.Tensor:
    return matcher.cost_class * costs["class"] + matcher.cost_bbox * costs["bbox"] + matcher.cost_giou * costs["giou"]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), queries=st.integers(1, 5), n=st.integers(0, 3),
       preset=st.sampled_from(sorted(PRESETS)))
def test_matches_exhaustive_search(seed: int, queries: int, n: int, preset: str) -> None:
    outputs, targets = make_batch(seed, [n], queries=queries, length=6, width=12)
    matcher = HungarianMatcher(preset)
    (rows, cols), = matcher(outputs, targets)
    assert len(rows) == len(cols) == min(queries, n)
    cost = total_cost(matching_costs(outputs, targets, preset=preset)[0], matcher).double()
    got = float(cost[rows, cols].sum())
    if queries >= n:
        best = min(sum(float(cost[q, b]) for b, q in enumerate(perm))
                   for perm in itertools.permutations(range(queries), n))
    else:
        best = min(sum(float(cost[q, b]) for q, b in enumerate(perm))
                   for perm in itertools.permutations(range(n), queries))
    assert got == pytest.approx(best, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_batch_equals_one_image_at_a_time(preset: str) -> None:
    outputs, targets = make_batch(1, [3, 0, 5, 1], queries=20)
    matcher = HungarianMatcher(preset)
    batched = matcher(outputs, targets)
    for i, t in enumerate(targets):
        alone = {k: v[i:i + 1] for k, v in outputs.items()}
        (rows, cols), = matcher(alone, [t])
        assert torch.equal(rows, batched[i][0]) and torch.equal(cols, batched[i][1])


def test_images_without_boxes_give_empty_matches() -> None:
    outputs, targets = make_batch(2, [0, 2, 0])
    matches = HungarianMatcher()(outputs, targets)
    assert [len(r) for r, _ in matches] == [0, 2, 0]
    all_empty = HungarianMatcher()(outputs, [targets[0]] * 3)
    assert all(len(r) == len(c) == 0 and r.dtype == torch.int64 for r, c in all_empty)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_padded_columns_add_exactly_zero(preset: str) -> None:
    # p = sigmoid(-inf) = 0: neg_cost is 0 there and the targets are 0, so using all 256 columns
    # (naive) gives the costs of the valid columns alone (masked).
    outputs, targets = make_batch(3, [4, 2], queries=30)
    masked = matching_costs(outputs, targets, preset=preset, masked=True)
    naive = matching_costs(outputs, targets, preset=preset, masked=False)
    for m, n in zip(masked, naive):
        for term in ("class", "bbox", "giou"):
            torch.testing.assert_close(m[term], n[term], rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for x, y in zip(HungarianMatcher(preset, masked=True)(outputs, targets),
                                                 HungarianMatcher(preset, masked=False)(outputs, targets))
               for a, b in zip(x, y))


def mmdet_binary_focal_cost(logits: torch.Tensor, pmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MMDetection 3.x BinaryFocalLossCost for one image, written out as mmdet does it (not weighted)."""
    idx = torch.nonzero(mask).squeeze(-1)
    scores = logits[:, idx].sigmoid()
    gt = (pmap[:, idx] > 0).float()  # mmdet binarizes positive maps (.bool().float()) before matching
    neg = -(1 - scores + 1e-12).log() * (1 - 0.25) * scores.pow(2)
    pos = -(scores + 1e-12).log() * 0.25 * (1 - scores).pow(2)
    return torch.einsum("nc,mc->nm", pos, gt) + torch.einsum("nc,mc->nm", neg, 1 - gt)


def test_mmdet_class_cost_matches_mmdetection_formula() -> None:
    outputs, targets = make_batch(4, [3, 5])
    costs = matching_costs(outputs, targets, preset="mmdet")
    valid, _ = text_validity(outputs)
    for i, t in enumerate(targets):
        expected = mmdet_binary_focal_cost(outputs["pred_logits"][i], t["positive_map"], valid[i])
        torch.testing.assert_close(costs[i]["class"], expected, rtol=1e-5, atol=1e-5)




def transformers_matcher():
    from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher

    return GroundingDinoHungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)


def hf_inputs(outputs: dict, targets: list[dict]) -> tuple[dict, list[dict]]:
    """The same batch in transformers' form: each box its own class, label_maps = positive maps."""
    hf_out = {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"],
              "label_maps": tuple(t["positive_map"] for t in targets)}
    labels = [{"class_labels": torch.arange(len(t["boxes"])), "boxes": t["boxes"]} for t in targets]
    return hf_out, labels


def test_hf_preset_matches_transformers_matcher() -> None:
    outputs, targets = make_batch(5, [4, 6, 2], queries=40)
    hf_out, labels = hf_inputs(outputs, targets)
    expected = transformers_matcher()(hf_out, labels)
    got = HungarianMatcher("hf")(outputs, targets)
    for (er, ec), (gr, gc) in zip(expected, got):
        assert torch.equal(er, gr) and torch.equal(ec, gc)


def test_empty_positive_row_is_guarded_and_reported() -> None:
    outputs, targets = make_batch(6, [3], queries=10)
    targets[0]["positive_map"][1] = 0  # a phrase that mapped to no token
    hf_out, labels = hf_inputs(outputs, targets)
    if TRANSFORMERS_NONFINITE_COSTS_TO_MAX:
        # 0/0 -> NaN costs for box 1 -> all the largest float: it matches, and boxes 0 and 2 get the
        # queries they get without box 1 (a constant column cannot change the others' optimum)
        ((rows, cols),) = transformers_matcher()(hf_out, labels)
        assert sorted(cols.tolist()) == [0, 1, 2] and len(set(rows.tolist())) == 3
        keep = [0, 2]
        reduced = [{"boxes": targets[0]["boxes"][keep], "positive_map": targets[0]["positive_map"][keep]}]
        ((kept_rows, kept_cols),) = HungarianMatcher("hf")(outputs, reduced)
        theirs = {int(c): int(r) for r, c in zip(rows, cols)}
        assert {keep[int(c)]: int(r) for r, c in zip(kept_rows, kept_cols)} == {0: theirs[0], 2: theirs[2]}
    else:
        with pytest.raises(ValueError):  # transformers: 0/0 -> NaN costs -> scipy refuses them
            transformers_matcher()(hf_out, labels)
    for preset in ("hf", "open-groundingdino", "mmdet"):
        costs = matching_costs(outputs, targets, preset=preset)[0]
        assert costs["empty_rows"].tolist() == [False, True, False]
        assert torch.isfinite(costs["class"]).all()
        if get_preset(preset).match_cost == "normalized_row":
            assert torch.equal(costs["class"][:, 1], torch.zeros(10))
        assert len(HungarianMatcher(preset)(outputs, targets)[0][0]) == 3


def test_nan_box_error_names_image_query_box_and_term() -> None:
    outputs, targets = make_batch(7, [2, 3])
    targets[1]["boxes"][2, 0] = float("nan")
    with pytest.raises(MatchingError) as info:
        HungarianMatcher()(outputs, targets, layer="aux decoder layer 2")
    msg = str(info.value)
    assert "image 1, query 0, box 2" in msg and "'bbox' and 'giou'" in msg and "aux decoder layer 2" in msg
    assert (info.value.image, info.value.query, info.value.box) == (1, 0, 2)
    assert info.value.terms == ("bbox", "giou")


def test_nan_logit_error_names_the_class_term_only_at_valid_positions() -> None:
    outputs, targets = make_batch(8, [2, 2])
    outputs["pred_logits"][0, :, 200] = float("nan")  # a padded column: ignored when masked
    assert len(HungarianMatcher()(outputs, targets)) == 2
    outputs["pred_logits"][1, 4, 3] = float("nan")  # a valid token
    with pytest.raises(MatchingError, match=r"image 1, query 4, box 0, term 'class'"):
        HungarianMatcher()(outputs, targets)


def test_text_validity_from_mask_and_from_logits_agree() -> None:
    outputs, _ = make_batch(9, [1, 1, 1])
    from_mask, source = text_validity(outputs)
    assert source == "text_token_mask" and from_mask.shape == (3, 256)
    from_logits, source = text_validity({"pred_logits": outputs["pred_logits"]})
    assert source == "logits" and torch.equal(from_mask, from_logits)


def test_bad_arguments_name_what_was_expected() -> None:
    with pytest.raises(InputError, match="valid presets: hf, mmdet, open-groundingdino"):
        HungarianMatcher("detr")
    outputs, targets = make_batch(10, [1, 1])
    del targets[1]["positive_map"]
    with pytest.raises(InputError, match="target 1 has no 'positive_map'"):
        HungarianMatcher()(outputs, targets)
    assert math.isfinite(HungarianMatcher(cost_class=0).cost_bbox)


def test_match_layers_equals_one_call_per_layer() -> None:
    outputs, targets = make_batch(11, [3, 0, 4], queries=15)
    second, _ = make_batch(12, [3, 0, 4], queries=15)
    matcher = HungarianMatcher("open-groundingdino")
    padded = matcher.pad(outputs, targets)
    together = matcher.match_layers([outputs, second], padded)
    one_by_one = [matcher(outputs, targets), matcher(second, targets)]
    assert [[len(q) for q, _ in layer] for layer in together] == [[3, 0, 4], [3, 0, 4]]
    for layer, expected in zip(together, one_by_one):
        for (q, b), (eq, eb) in zip(layer, expected):
            assert torch.equal(q, eq) and torch.equal(b, eb)
