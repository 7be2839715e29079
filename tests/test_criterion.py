"""SetCriterion against transformers and groundingdino-py, property tests, DETR invariants."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nanscope.criterion.set_criterion as criterion_module
from nanscope.criterion.set_criterion import NaiveCriterion, SetCriterion, presets_markdown
from nanscope.errors import CriterionError, InputError, MatchingError
from nanscope.criterion.focal import focal_sum_syncfree, focal_terms
from nanscope.criterion.presets import PRESETS, get_preset, register_preset

NEG_INF = float("-inf")
T = 256


def label_map(n_classes: int, length: int, g: torch.Generator) -> torch.Tensor:
    """[n_classes, 256] binary: class c covers 1-2 tokens inside the first `length` positions."""
    out = torch.zeros(n_classes, T)
    for c in range(n_classes):
        start = int(torch.randint(1, length - 2, (1,), generator=g))
        out[c, start:start + 1 + c % 2] = 1
    return out


def make_case(seed: int, *, lengths: list[int], classes: list[int], boxes: list[int], queries: int = 30,
              layers: int = 3) -> dict:
    """One batch in nanscope's and transformers' forms; logits of all layers are leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    mask = torch.zeros(batch, max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    full = torch.nn.functional.pad(mask, (0, T - mask.shape[1]))
    preds = []
    for _ in range(layers + 1):  # decoder layers, then encoder proposals
        logits = (2 * torch.randn(batch, queries, T, generator=g)).masked_fill(~full[:, None, :], NEG_INF)
        preds.append((logits.requires_grad_(), (torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.25).requires_grad_()))
    maps = [label_map(c, n, g) for c, n in zip(classes, lengths)]
    labels, targets = [], []
    for i, n in enumerate(boxes):
        cls = torch.randint(0, classes[i], (n,), generator=g)
        b = torch.rand(n, 4, generator=g) * 0.4 + 0.3
        labels.append({"class_labels": cls, "boxes": b})
        pmap = maps[i][cls]
        targets.append({"boxes": b, "positive_map": pmap / (pmap.sum(-1, keepdim=True) + 1e-6)})
    (last_logits, last_boxes), aux, enc = preds[layers - 1], preds[: layers - 1], preds[layers]
    outputs = {"pred_logits": last_logits, "pred_boxes": last_boxes, "text_token_mask": mask,
               "aux_outputs": [{"pred_logits": lo, "pred_boxes": bo} for lo, bo in aux],
               "enc_outputs": {"pred_logits": enc[0], "pred_boxes": enc[1]}}
    return {"outputs": outputs, "targets": targets, "labels": labels, "label_maps": tuple(maps), "full": full,
            "preds": preds, "layers": layers}


def transformers_loss(case: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from transformers.loss.loss_grounding_dino import GroundingDinoForObjectDetectionLoss

    layers, preds = case["layers"], case["preds"]
    batch, queries = preds[0][0].shape[:2]
    config = SimpleNamespace(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0, focal_alpha=0.25, auxiliary_loss=True,
                             two_stage=True, decoder_layers=layers, bbox_loss_coefficient=5.0,
                             giou_loss_coefficient=2.0)
    loss, loss_dict, _ = GroundingDinoForObjectDetectionLoss(
        logits=preds[layers - 1][0], labels=case["labels"], device="cpu", pred_boxes=preds[layers - 1][1],
        config=config, label_maps=case["label_maps"], text_mask=case["full"][:, None, :].expand(batch, queries, T),
        outputs_class=[p[0] for p in preds[:layers]], outputs_coord=[p[1] for p in preds[:layers]],
        encoder_logits=preds[layers][0], encoder_pred_boxes=preds[layers][1])
    return loss, {k: v for k, v in loss_dict.items() if "cardinality" not in k}


def test_hf_preset_equals_transformers_loss_for_one_caption() -> None:
    case = make_case(0, lengths=[14, 14, 14], classes=[4, 4, 4], boxes=[3, 5, 2])
    case["label_maps"] = (case["label_maps"][0],) * 3
    for t, lab in zip(case["targets"], case["labels"]):
        t["positive_map"] = case["label_maps"][0][lab["class_labels"]]
    expected_total, expected = transformers_loss(case)
    crit = SetCriterion("hf", aux_loss=True)
    got = crit(case["outputs"], case["targets"])
    assert sorted(got) == sorted(expected)  # loss_ce, _0, _1, _enc, ... named the same way
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5, msg=k)
    torch.testing.assert_close(crit.total(got), expected_total, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(crit.total(got), case["outputs"]["pred_logits"])[0]
    ref_grads = torch.autograd.grad(expected_total, case["outputs"]["pred_logits"])[0]
    torch.testing.assert_close(grads, ref_grads, rtol=1e-5, atol=1e-6)


def test_different_captions_expose_transformers_class_offset() -> None:
    # transformers 4.57 `_get_target_classes_one_hot` offsets image i's class labels by
    # len(label_maps[i]) instead of the number of classes of images 0..i-1. With different captions
    # the classification targets of images 1 and 2 are rows of the wrong captions; matching (which
    # indexes label_maps per image) and the box losses are right. nanscope uses each image's own
    # positive map, so only loss_ce differs - and it equals transformers' once we plant their rows.
    case = make_case(1, lengths=[12, 20, 9], classes=[3, 5, 2], boxes=[2, 4, 3], layers=1)
    _, expected = transformers_loss(case)
    crit = SetCriterion("hf", aux_loss=True)
    got = crit(case["outputs"], case["targets"])
    for k in ("loss_bbox", "loss_giou", "loss_bbox_enc", "loss_giou_enc"):
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5, msg=k)
    assert abs(float(got["loss_ce"].detach()) - float(expected["loss_ce"].detach())) > 1e-3

    rows = torch.cat(case["label_maps"])
    planted = [dict(t, positive_map=rows[lab["class_labels"] + (len(case["label_maps"][i]) if i else 0)])
               for i, (t, lab) in enumerate(zip(case["targets"], case["labels"]))]
    indices = crit.matcher(case["outputs"], case["targets"])  # the matching transformers also finds
    logits = case["outputs"]["pred_logits"]
    target = torch.zeros_like(logits)
    for i, (q, b) in enumerate(indices):
        target[i, q] = planted[i]["positive_map"][b]
    valid = case["full"][:, None, :]
    buggy = focal_sum_syncfree(logits, target, valid) / sum(len(t["boxes"]) for t in case["targets"])
    torch.testing.assert_close(buggy, expected["loss_ce"], rtol=1e-5, atol=1e-5)


def test_focal_terms_equal_groundingdino_py_on_valid_positions() -> None:
    from groundingdino.models.GroundingDINO.utils import sigmoid_focal_loss as gd_focal

    g = torch.Generator().manual_seed(2)
    valid = torch.rand(3, 20, T, generator=g) < 0.1
    logits = (3 * torch.randn(3, 20, T, generator=g)).masked_fill(~valid, NEG_INF)
    targets = (torch.rand(3, 20, T, generator=g) < 0.2).float()
    ours = focal_terms(logits, targets, valid)
    expected = gd_focal(logits[valid], targets[valid], num_boxes=1, no_reduction=True)
    torch.testing.assert_close(ours[valid], expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours[~valid], torch.zeros(int((~valid).sum())))
    assert torch.isnan(gd_focal(logits, targets, num_boxes=1, no_reduction=True)[~valid]).all()


def random_case(seed: int, batch: int, queries: int, length: int, pad: int, boxes: list[int], p_inf: float,
                with_mask: bool) -> tuple[dict, list[dict]]:
    """Random logits, -inf at a random share of the invalid positions, random masks and positive maps."""
    g = torch.Generator().manual_seed(seed)
    width = length + pad
    valid = torch.rand(batch, length, generator=g) < 0.6
    full = torch.nn.functional.pad(valid, (0, pad))
    logits = 4 * torch.randn(batch, queries, width, generator=g)
    inf_at = (~full[:, None, :]) & (torch.rand(batch, queries, width, generator=g) < p_inf)
    if not with_mask:  # validity must then come from the logits: whole invalid columns are -inf
        inf_at = (~full[:, None, :]).expand_as(logits)
    logits = logits.masked_fill(inf_at, NEG_INF).requires_grad_()
    outputs = {"pred_logits": logits, "pred_boxes": (torch.rand(batch, queries, 4, generator=g) * 0.6 + 0.2)
               .requires_grad_()}
    if with_mask:
        outputs["text_token_mask"] = valid
    targets = [{"boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25,
                "positive_map": (torch.rand(n, width, generator=g) < 0.3).float()} for n in boxes]
    return outputs, targets


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), queries=st.integers(1, 6),
       length=st.integers(1, 8), pad=st.integers(0, 5), boxes=st.lists(st.integers(0, 3), min_size=3, max_size=3),
       p_inf=st.floats(0, 1), with_mask=st.booleans(), preset=st.sampled_from(sorted(PRESETS)))
def test_masked_criterion_is_finite_and_implementations_agree(seed, batch, queries, length, pad, boxes, p_inf,
                                                              with_mask, preset) -> None:
    outputs, targets = random_case(seed, batch, queries, length, pad, boxes[:batch], p_inf, with_mask)
    results = []
    for impl in ("syncfree", "masked_select"):
        crit = SetCriterion(preset, impl=impl)
        losses = crit(outputs, targets)
        total = crit.total(losses)
        grads = torch.autograd.grad(total, [outputs["pred_logits"], outputs["pred_boxes"]])
        assert torch.isfinite(total), losses
        assert all(torch.isfinite(gr).all() for gr in grads)
        results.append((losses, grads))
    (la, ga), (lb, gb) = results
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=1e-6, atol=1e-6, msg=k)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_syncfree_focal_compiles_without_graph_breaks() -> None:
    outputs, targets = random_case(3, 2, 5, 6, 3, [2, 1], 1.0, True)
    valid = torch.nn.functional.pad(outputs["text_token_mask"], (0, 3))[:, None, :]
    target = torch.zeros_like(outputs["pred_logits"])
    compiled = torch.compile(focal_sum_syncfree, fullgraph=True, backend="aot_eager")
    value = compiled(outputs["pred_logits"], target, valid)
    (grad,) = torch.autograd.grad(value, outputs["pred_logits"])
    torch.testing.assert_close(value, focal_sum_syncfree(outputs["pred_logits"], target, valid))
    assert torch.isfinite(grad).all()


def test_naive_is_nan_on_padded_logits_and_equal_without_padding() -> None:
    case = make_case(4, lengths=[10, 7], classes=[3, 3], boxes=[2, 3])
    naive = NaiveCriterion("mmdet")(case["outputs"], case["targets"])
    assert torch.isnan(naive["loss_ce"]) and torch.isfinite(naive["loss_bbox"])
    assert all(torch.isnan(v) for k, v in naive.items() if k.startswith("loss_ce"))

    g = torch.Generator().manual_seed(5)
    outputs = {"pred_logits": torch.randn(2, 12, T, generator=g, requires_grad=True),
               "pred_boxes": torch.rand(2, 12, 4, generator=g) * 0.5 + 0.25,
               "text_token_mask": torch.ones(2, T, dtype=torch.bool)}
    for preset in PRESETS:
        fixed, naive = SetCriterion(preset)(outputs, case["targets"]), NaiveCriterion(preset)(outputs, case["targets"])
        for k in fixed:
            torch.testing.assert_close(fixed[k], naive[k], rtol=1e-6, atol=1e-6, msg=k)


def test_images_without_boxes_give_no_matches_and_a_finite_loss() -> None:
    case = make_case(6, lengths=[10, 8], classes=[3, 3], boxes=[0, 2])
    crit = SetCriterion("mmdet")
    assert [len(q) for q, _ in crit.matcher(case["outputs"], case["targets"])] == [0, 2]
    empty = [dict(t, boxes=t["boxes"][:0], positive_map=t["positive_map"][:0]) for t in case["targets"]]
    for targets in (case["targets"], empty):
        for preset in PRESETS:
            losses = SetCriterion(preset)(case["outputs"], targets)
            assert all(torch.isfinite(v) for v in losses.values())
    losses = crit(case["outputs"], empty)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0 and losses["loss_ce"].item() > 0


def test_validity_from_logits_gives_the_same_loss() -> None:
    case = make_case(7, lengths=[11, 6], classes=[2, 3], boxes=[2, 2])
    with_mask = SetCriterion("mmdet")(case["outputs"], case["targets"])
    no_mask = {k: v for k, v in case["outputs"].items() if k != "text_token_mask"}
    without = SetCriterion("mmdet")(no_mask, case["targets"])
    for k in with_mask:
        torch.testing.assert_close(with_mask[k], without[k], rtol=1e-6, atol=1e-6, msg=k)


def test_terms_weights_and_layers_follow_the_preset() -> None:
    case = make_case(8, lengths=[9], classes=[2], boxes=[1], layers=3)
    mm = SetCriterion("mmdet")(case["outputs"], case["targets"])
    assert sorted(mm) == sorted(f"{t}{s}" for t in ("loss_ce", "loss_bbox", "loss_giou")
                                for s in ("", "_0", "_1", "_enc"))
    assert sorted(SetCriterion("hf")(case["outputs"], case["targets"])) == sorted(
        f"{t}{s}" for t in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_enc"))
    crit = SetCriterion("open-groundingdino")
    assert crit.weight_dict["loss_ce_1"] == 2.0 and crit.weight_dict["loss_bbox_enc"] == 5.0
    assert dict(crit.weight_dict) == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    with pytest.raises(KeyError):
        crit.weight_dict["loss_mask"]
    losses = {"loss_ce": torch.tensor(1.0), "loss_giou_0": torch.tensor(1.0)}
    assert float(crit.total(losses)) == 4.0


def test_docstring_table_is_generated_from_the_registry() -> None:
    assert presets_markdown() in criterion_module.__doc__


def test_registry_refuses_duplicates_and_lists_valid_names() -> None:
    with pytest.raises(CriterionError, match="already registered"):
        register_preset(PRESETS["mmdet"])
    with pytest.raises(InputError, match="valid presets: hf, mmdet, open-groundingdino"):
        SetCriterion("detr")
    with pytest.raises(InputError, match="valid: syncfree, masked_select"):
        SetCriterion(impl="fast")
    assert get_preset(PRESETS["hf"]) is PRESETS["hf"]


def test_matching_error_names_the_layer() -> None:
    case = make_case(9, lengths=[9, 9], classes=[2, 2], boxes=[1, 2], layers=3)
    with torch.no_grad():
        case["outputs"]["aux_outputs"][1]["pred_boxes"][1, 5] = float("nan")
    with pytest.raises(MatchingError, match=r"in layer aux decoder layer 1: image 1, query 5, box 0, term 'bbox'"):
        SetCriterion("mmdet")(case["outputs"], case["targets"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_syncfree_focal_never_syncs_and_criterion_syncs_once() -> None:
    case = make_case(10, lengths=[12, 7], classes=[3, 2], boxes=[2, 3], layers=3)
    def leaf(x: torch.Tensor) -> torch.Tensor:  # a CUDA leaf: no gradient copy back to the CPU
        return x.detach().cuda().requires_grad_(x.is_floating_point())

    cuda = {k: leaf(v) for k, v in case["outputs"].items() if torch.is_tensor(v)}
    cuda["aux_outputs"] = [{k: leaf(v) for k, v in a.items()} for a in case["outputs"]["aux_outputs"]]
    cuda["enc_outputs"] = {k: leaf(v) for k, v in case["outputs"]["enc_outputs"].items()}
    logits = cuda["pred_logits"]
    targets = [{k: v.cuda() for k, v in t.items()} for t in case["targets"]]
    valid = torch.nn.functional.pad(cuda["text_token_mask"], (0, T - 12))[:, None, :]
    target = torch.zeros_like(logits)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        focal_sum_syncfree(logits, target, valid).backward()
        with pytest.raises(RuntimeError):  # the reference has to ask the device for its output size
            criterion_module.focal_sum_masked_select(logits, target, valid)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    crit = SetCriterion("mmdet")
    torch.cuda.synchronize()
    with pytest.warns(UserWarning, match="called a synchronizing") as caught:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            losses = crit(cuda, targets)
            crit.total(losses).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "called a synchronizing" in str(w.message)]
    assert len(syncs) == 1, syncs  # the cost copy for scipy
    cpu = SetCriterion("mmdet")(case["outputs"], case["targets"])
    for k in cpu:
        torch.testing.assert_close(losses[k].cpu(), cpu[k], rtol=1e-5, atol=1e-5, msg=k)


def test_normalizers_are_averaged_over_ranks_when_distributed(tmp_path) -> None:
    import torch.distributed as dist

    case = make_case(11, lengths=[9, 12], classes=[2, 3], boxes=[2, 3], layers=2)
    alone = {p: SetCriterion(p)(case["outputs"], case["targets"]) for p in PRESETS}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grouped = {p: SetCriterion(p)(case["outputs"], case["targets"]) for p in PRESETS}
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()
    for p in PRESETS:
        for k in alone[p]:
            torch.testing.assert_close(grouped[p][k], alone[p][k], msg=f"{p} {k}")
