"""verify-fix: the real CLI on the demo model, a broken and a raising criterion, numbers against transformers."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from nanscope.cli import main
from nanscope.verify.peak_memory import PeakMemory
from nanscope.terms import term_layer
from nanscope.verify.checks import compare_terms
from nanscope.verify.equivalence import unpadded_batch

BROKEN_AFTER = '''
import torch
from torchvision.ops import sigmoid_focal_loss

from nanscope.criterion.set_criterion import SetCriterion
from nanscope.criterion.text_mask import text_validity


class MaskMultiplied(SetCriterion):
    """Multiplies the per-position focal loss by the text mask instead of removing positions: NaN * 0 = NaN."""

    def _loss_ce(self, layer, padded, idx):
        batch, query, box = idx
        logits = layer["pred_logits"][..., : padded.maps.shape[-1]]
        target = torch.zeros_like(logits)
        target[batch, query] = (padded.maps[batch, box] > 0).to(logits.dtype)
        valid = text_validity(layer)[0][:, None, : logits.shape[-1]]
        return (sigmoid_focal_loss(logits, target, reduction="none") * valid).sum()
'''

RAISING = '''def explode(outputs, targets):
    raise ValueError("positive_map has the wrong width")  # line 2
'''


@pytest.fixture(scope="module")
def short(demo_files, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The demo model with the two short captions (6 and 13 tokens; padded, nothing truncated)."""
    from nanscope.replay.batch import save_batch
    from nanscope.stacks.groundingdino.demo import demo_batch

    folder = tmp_path_factory.mktemp("verify")
    batch = save_batch(folder / "short.pt", demo_batch(0, long=False))
    return SimpleNamespace(folder=folder, batch=batch, checkpoint=demo_files.checkpoint, config=demo_files.config)


def _args(short: SimpleNamespace, *extra: str) -> list[str]:
    return ["verify-fix", str(short.checkpoint), str(short.batch), "--config", str(short.config), *extra]


def test_cli_passes_all_ten_checks_and_matches_transformers(short, capsys) -> None:
    out = short.folder / "hf.json"
    code = main(_args(short, "--preset", "hf", "--steps", "2", "--json", str(out)))
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "FIXED - 10/10 checks pass" in stdout
    d = json.loads(out.read_text())
    assert [c["id"] for c in d["checks"]] == list(range(1, 11))
    assert all(c["passed"] for c in d["checks"]), [c for c in d["checks"] if not c["passed"]]
    assert d["verdict"] == "fixed" and d["exit_code"] == 0

    terms = {r["term"]: r for r in d["tables"]["terms"]}
    assert terms["loss_ce"]["before"] == "nan" and terms["loss_ce_enc"]["before"] == "nan"  # the bug, reproduced
    assert all(isinstance(r["after"], float) and math.isfinite(r["after"]) for r in terms.values())
    assert terms["loss_ce_enc"]["layer"] == "enc" and terms["loss_ce"]["layer"] == "dec0"
    steps = d["tables"]["steps"]
    assert [s["before"] for s in steps] == ["nan", None]  # non-finite at step 0, not run after
    assert steps[1]["after"] < steps[0]["after"]
    assert steps[0]["after"] == pytest.approx(terms["total (weighted)"]["after"], rel=1e-6)  # same model, same loss
    mem = d["tables"]["memory"]
    assert 0 < mem["after_bytes"] and 0 < mem["before_bytes"] and mem["ratio"] <= 1.5
    # The naive loss works on all 256 columns, the fixed one on the 13 the batch has: less memory for the loss.
    assert mem["after_loss_bytes"] < mem["before_loss_bytes"]

    # Independent reference: transformers' own GroundingDINO loss on a fresh replay of the same batch.
    # Both images have 2 boxes, so transformers' class-label offset (len(label_maps[i])) happens to be right.
    from transformers.loss.loss_grounding_dino import GroundingDinoForObjectDetectionLoss

    from nanscope.replay.session import prepare

    replay = prepare(short.checkpoint, short.batch, config=short.config, hash_checkpoint=False)
    outputs = replay.forward(detach=True).to_outputs()
    logits = outputs["pred_logits"]
    B, Q, T = logits.shape
    mask = torch.nn.functional.pad(outputs["text_token_mask"], (0, T - outputs["text_token_mask"].shape[1]))
    label_maps = tuple((t["positive_map"] > 0).float() for t in replay.targets())
    labels = [{"class_labels": torch.arange(len(t["boxes"])), "boxes": t["boxes"]} for t in replay.targets()]
    config = SimpleNamespace(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0, focal_alpha=0.25, auxiliary_loss=False,
                             two_stage=True, decoder_layers=1, bbox_loss_coefficient=5.0, giou_loss_coefficient=2.0)
    total, expected, _ = GroundingDinoForObjectDetectionLoss(
        logits=logits, labels=labels, device="cpu", pred_boxes=outputs["pred_boxes"], config=config,
        label_maps=label_maps, text_mask=mask[:, None, :].expand(B, Q, T),
        encoder_logits=outputs["enc_outputs"]["pred_logits"], encoder_pred_boxes=outputs["enc_outputs"]["pred_boxes"])
    for k, v in expected.items():
        if "cardinality" not in k:
            assert terms[k]["after"] == pytest.approx(float(v), rel=1e-5), k
    assert terms["total (weighted)"]["after"] == pytest.approx(float(total), rel=1e-5)
    # Check 4's own reference agrees with transformers too.
    reference = next(c for c in d["checks"] if c["id"] == 4)["numbers"]["reference"]
    assert reference["loss_ce"] == pytest.approx(float(expected["loss_ce"]), rel=1e-5)


def test_cli_mask_multiplied_after_fails_checks_2_and_3(short, capsys) -> None:
    path = short.folder / "broken_after.py"
    path.write_text(BROKEN_AFTER)
    out = short.folder / "broken.json"
    code = main(_args(short, "--after", f"{path}:MaskMultiplied", "--steps", "2", "--json", str(out)))
    stdout = capsys.readouterr().out
    assert code == 1, stdout
    assert "NOT FIXED" in stdout
    checks = {c["id"]: c for c in json.loads(out.read_text())["checks"]}
    assert len(checks) == 10
    assert checks[1]["passed"]  # the default before (naive, mmdet) reproduces the NaN
    assert not checks[2]["passed"] and "loss_ce" in checks[2]["numbers"]["nonfinite"]
    assert not checks[3]["passed"] and checks[3]["numbers"]["after_nonfinite_output_grads"]
    assert not checks[4]["passed"]  # NaN is not the masked_select reference
    assert not checks[8]["passed"] and checks[8]["numbers"]["after_nonfinite_step"] == 0


def test_cli_raising_criterion_exits_2_naming_the_users_line(short, capsys) -> None:
    path = short.folder / "raising.py"
    path.write_text(RAISING)
    code = main(_args(short, "--before", f"{path}:explode", "--steps", "2"))
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path}:2 in explode" in err and "ValueError: positive_map has the wrong width" in err


def test_cli_import_error_and_bad_steps_exit_2(short, capsys) -> None:
    path = short.folder / "typo.py"
    path.write_text("import torch\nfrom torch import not_a_module\n")
    assert main(_args(short, "--after", f"{path}:Crit")) == 2
    err = capsys.readouterr().err
    assert "failed to import" in err and f"{path}:2" in err
    assert main(_args(short, "--steps", "1")) == 2
    assert "at least 2" in capsys.readouterr().err


def test_stand_in_logit_contributes_exactly_zero() -> None:
    # Check 5's premise: at a target-0 position, a logit of -1e4 (or -2e4) adds exactly 0 to the focal loss
    # and its gradient, in every float type; at -inf both are NaN.
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.tensor([-1.0e4, -2.0e4], dtype=dtype, requires_grad=True)
        loss = sigmoid_focal_loss(x, torch.zeros_like(x), reduction="sum")
        loss.backward()
        assert loss.item() == 0.0 and bool((x.grad == 0).all()), dtype
    x = torch.tensor([float("-inf")], requires_grad=True)
    loss = sigmoid_focal_loss(x, torch.zeros_like(x), reduction="sum")
    loss.backward()
    assert math.isnan(loss.item()) and math.isnan(x.grad.item())


def test_unpadded_batch_keeps_only_columns_valid_everywhere() -> None:
    T, Q = 10, 3
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    full = torch.nn.functional.pad(mask, (0, T - 5))
    logits = torch.randn(2, Q, T).masked_fill(~full[:, None, :], float("-inf"))
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(2, Q, 4), "text_token_mask": mask,
               "aux_outputs": [{"pred_logits": logits.clone(), "pred_boxes": torch.rand(2, Q, 4)}]}
    pm0 = torch.zeros(2, T)
    pm0[0, 1], pm0[1, 3] = 1, 1  # box 1's only token is valid in image 0 alone: dropped
    pm1 = torch.zeros(1, T)
    pm1[0, 2] = 1
    targets = [{"boxes": torch.rand(2, 4), "positive_map": pm0}, {"boxes": torch.rand(1, 4), "positive_map": pm1}]
    out, tg, info = unpadded_batch(outputs, targets)
    assert info == {"columns": 3, "boxes_kept": 2, "boxes_dropped": 1}
    assert out["pred_logits"].shape == (2, Q, 3) and bool(torch.isfinite(out["pred_logits"]).all())
    assert out["aux_outputs"][0]["pred_logits"].shape == (2, Q, 3)
    assert bool(out["text_token_mask"].all()) and out["text_token_mask"].shape == (2, 3)
    assert torch.equal(tg[0]["boxes"], targets[0]["boxes"][:1]) and tg[0]["positive_map"].tolist() == [[0, 1, 0]]
    assert tg[1]["positive_map"].tolist() == [[0, 0, 1]]


def test_compare_terms_and_term_layers() -> None:
    cmp = compare_terms({"a": 1.0, "b": float("nan"), "c": 2.0}, {"a": 1.0 + 1e-7, "b": float("nan"), "c": 2.1,
                                                                   "d": 0.0})
    assert cmp["mismatched"] == ["c"] and cmp["missing"] == ["d"] and not cmp["equal"]
    assert compare_terms({"a": 0.0}, {"a": 0.0})["equal"]
    assert compare_terms({"a": float("nan")}, {"a": 1.0})["mismatched"] == ["a"]
    assert [term_layer(k, "dec5") for k in ("loss_ce", "loss_bbox_0", "loss_giou_enc", "cardinality_error")] == \
        ["dec5", "dec0", "enc", "dec5"]


def test_peak_memory_counts_fresh_storages_and_removes_its_mode() -> None:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    x = torch.ones(1024, 1024)  # 4 MiB, allocated before: a view of it is not counted
    with PeakMemory("cpu") as mem:
        v = x[:10]
        y = x * 2  # 4 MiB
        z = y + 1  # 4 MiB more while y lives
        del y, z
        w = x.sum()
        assert mem.peak_so_far() == 2 * 4 * 2**20
    assert mem.peak_bytes == 8 * 2**20 and v.shape == (10, 1024) and float(w) == 2**20
    assert _get_current_dispatch_mode() is None
    with pytest.raises(RuntimeError), PeakMemory("cpu"):
        raise RuntimeError("inside")
    assert _get_current_dispatch_mode() is None
