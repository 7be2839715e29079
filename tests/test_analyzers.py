"""The issue-4 analyzers on the real demo GroundingDINO: each cause is planted in the batch or the
weights, and the test checks the code, the location a person knows (image, box, phrase, query, token,
module, parameter) and that the planted cause - not a symptom - ranks first."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from nanscope.analyzers import AnalysisContext, run_analyzers
from nanscope.analyzers.boxes import nonfinite_matching_cost, target_box_problems
from nanscope.analyzers.numerics import RISK_FACTOR, half_precision_risk
from nanscope.analyzers.targets import empty_positive_rows, non_binary_positive_map
from nanscope.replay.batch import validate_batch
from nanscope.cli import main
from nanscope.replay.diagnose import build_context, inspect_replay
from nanscope.errors import CriterionError, InputError
from nanscope.findings import Finding, Severity
from nanscope.stacks.groundingdino.demo import demo_batch
from nanscope.replay.module_stats import FP16_MAX, ModuleStat, module_stats
from nanscope.replay.positive_map import build_text_info
from nanscope.replay.session import Replay, prepare

from _planting import planted, set_nan

MASKED = "nanscope.criterion:SetCriterion"  # the fixed criterion: NS101 is only info with it
CRITERIA = str(Path(__file__).parents[1] / "fixtures" / "criteria" / "simple.py")
NAN = float("nan")


@pytest.fixture(scope="module")
def replay(demo_files) -> Iterator[Replay]:
    """This module's own Replay of the demo (long batch); tests that plant weights restore them.

    One intra-op thread: the demo model is small, and on a shared CI box threads only contend.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield prepare(demo_files.checkpoint, demo_files.batch, config=demo_files.config, hash_checkpoint=False)
    finally:
        torch.set_num_threads(threads)


def small(seed: int = 0, n: int = 2) -> dict[str, Any]:
    """A healthy batch of `n` (<= 2) short-caption images, as a raw schema dict to plant causes in."""
    raw = demo_batch(seed, long=False)
    return {"images": raw["images"][:n].clone(), "captions": raw["captions"][:n],
            "targets": [dict(t) for t in raw["targets"][:n]]}


def with_batch(replay: Replay, raw: dict[str, Any]) -> Replay:
    b = validate_batch(raw)
    return dataclasses.replace(replay, batch=b, texts=build_text_info(replay.model.tokenizer, b,
                                                                       max_text_len=replay.max_text_len))


def run(replay: Replay, raw: dict[str, Any] | None = None, **kw: Any):
    kw.setdefault("criterion", MASKED)
    return inspect_replay(with_batch(replay, raw) if raw is not None else replay, **kw)


def one(result: Any, code: str) -> Finding:
    found = [f for f in result.findings if f.code == code]
    assert len(found) == 1, [f.code for f in result.findings]
    return found[0]


def loud(result: Any) -> list[str]:
    return [f.code for f in result.findings if f.severity is not Severity.INFO]


# -- NS103 / NS102: positive maps ------------------------------------------------------------------

def test_phrase_absent_from_caption_is_ns103_ranked_first(replay):
    raw = small()
    raw["targets"][1] = {"boxes": raw["targets"][1]["boxes"], "phrases": ["zebra", "blue bus"]}  # no bus in it
    result = run(replay, raw)
    f = one(result, "NS103")
    assert f.where == ({"image": 1, "box": 1, "phrase": "blue bus", "why": "phrase not found in the caption"},)
    assert "0 by 0" in f.message
    assert result.findings[0].code == "NS103"
    # The symptom it causes in a row-normalizing matcher ranks below it, as a warning.
    ns203 = one(result, "NS203")
    assert ns203.severity is Severity.WARNING and ns203.data["empty_rows"] == [[1, 1]]


def test_fully_truncated_phrases_give_ns102_first_and_ns103(replay):
    result = run(replay)
    assert [f.code for f in result.findings][:3] == ["NS104", "NS102", "NS103"]  # the caption, then what it cuts
    f = one(result, "NS103")
    assert [(w["image"], w["box"]) for w in f.where] == [(2, 1), (2, 2)]
    info = replay.texts[2]
    for w in f.where:
        assert w["why"].startswith("truncated") and min(w["tokens"]) >= 256
        assert w["phrase"] == replay.batch.targets[2].phrases[w["box"]]
        assert w["token_text"] == " ".join(info.tokens[t] for t in w["tokens"]) == w["phrase"]


def test_span_over_whitespace_maps_to_no_token(replay):
    raw = small(n=1)
    raw["targets"][0] = {"boxes": raw["targets"][0]["boxes"], "tokens_positive": [[[0, 3]], [[3, 4]]]}  # 'cat', ' '
    b = validate_batch(raw)
    ctx = AnalysisContext(batch=b, texts=build_text_info(replay.model.tokenizer, b))
    (f,) = empty_positive_rows(ctx)
    assert f.where == ({"image": 0, "box": 1, "phrase": " ",
                        "why": "span covers no token (whitespace or characters the tokenizer drops)"},)


def test_fractional_positive_map_is_ns105(replay):
    """The batch schema carries phrases, not maps, so a replay's maps are binary: NS105 checks the maps
    a criterion is given, planted here in a context the way groundingdino normalizes them."""
    rep = with_batch(replay, small())
    ctx = build_context(rep, rep.forward())
    assert non_binary_positive_map(ctx) == []
    texts = list(ctx.texts)
    pmap = texts[1].positive_map
    texts[1] = dataclasses.replace(texts[1], positive_map=pmap / (pmap.sum(-1, keepdim=True) + 1e-6))
    ctx = dataclasses.replace(ctx, texts=texts)
    (f,) = non_binary_positive_map(ctx)
    assert f.code == "NS105" and f.count == 1  # 'zebra' is one token: 1 / (1 + 1e-6) is still binary
    (car,) = f.where
    assert car["image"] == 1 and car["phrase"] == "red car" and car["token_text"] == "red car"
    assert car["why"] == "row sums to 1 (normalized)" and car["values"] == [0.5]
    assert run_analyzers(ctx)[0].code == "NS105"


# -- NS201 / NS203 / NS204: target boxes and matching -------------------------------------------------

def test_zero_width_box_is_ns201_ranked_first(replay):
    raw = small()
    raw["targets"][0]["boxes"] = torch.tensor([[0.30, 0.40, 0.0, 0.30], [0.70, 0.60, 0.25, 0.35]])
    result = run(replay, raw)
    f = one(result, "NS201")
    assert len(f.where) == 1
    w = f.where[0]
    assert (w["image"], w["box"], w["phrase"]) == (0, 0, "cat") and w["why"].startswith("width or height <= 0")
    assert result.findings[0].code == "NS201"


def test_nan_target_box_ns201_first_and_ns203_names_box_and_terms(replay):
    raw = small()
    raw["targets"][1]["boxes"] = torch.tensor([[0.50, 0.50, 0.40, 0.40], [NAN, 0.75, 0.20, 0.15]])
    result = run(replay, raw)  # SetCriterion's matcher raises: inspect reports it instead of failing
    assert result.findings[0].code == "NS201"
    assert one(result, "NS201").where[0]["why"] == "non-finite (NaN/inf)"
    f = one(result, "NS203")
    assert f.severity is Severity.ERROR
    assert {(w["image"], w["box"], w["phrase"]) for w in f.where} == {(1, 1, "red car")}
    assert {w["term"] for w in f.where} == {"bbox+giou"}
    assert {w["layer"] for w in f.where} == {"enc", "dec0"}
    assert all(w["nonfinite"] == 900 and w["matcher"] == "naive and masked" for w in f.where)
    assert "Your criterion raised" in f.message and result.summary["criterion_error"]


def test_nan_logit_at_padded_column_breaks_only_the_naive_matcher(replay):
    rep = with_batch(replay, small())
    ctx = build_context(rep, rep.forward())
    assert nonfinite_matching_cost(ctx) == []
    logits = dict(ctx.logits)
    logits["dec0"] = logits["dec0"].clone()
    logits["dec0"][0, 7, 200] = NAN  # column 200 is padding for a 6-token caption
    (f,) = nonfinite_matching_cost(dataclasses.replace(ctx, logits=logits))
    assert f.severity is Severity.ERROR and f.count == 2  # query 7 x both boxes of image 0
    assert [(w["layer"], w["image"], w["box"], w["query"], w["term"], w["matcher"]) for w in f.where] == [
        ("dec0", 0, 0, 7, "class", "naive"), ("dec0", 0, 1, 7, "class", "naive")]


def test_matching_failure_of_the_users_criterion_is_an_ns203_error(replay):
    rep = with_batch(replay, small())
    ctx = build_context(rep, rep.forward())
    ctx.notes["criterion_error"] = "mine raised ValueError: matrix contains invalid numeric entries"
    (f,) = nonfinite_matching_cost(ctx)
    assert f.severity is Severity.ERROR and f.where == () and "invalid numeric entries" in f.message
    assert "computes its costs differently" in f.message


@pytest.mark.parametrize("boxes, why", [
    ([[120.0, 80.0, 60.0, 40.0]], "absolute pixels"),
    ([[0.5, 0.5, -0.2, 0.3]], "width or height <= 0"),
    ([[1.3, 0.5, 0.2, 0.3]], "outside [0, 1]"),
    ([[0.5, float("inf"), 0.2, 0.3]], "non-finite"),
    # xyxy: x2 > x1 and y2 > y1 everywhere, and read as cxcywh two reach past the image
    ([[0.1, 0.2, 0.6, 0.9], [0.55, 0.3, 0.95, 0.8], [0.3, 0.3, 0.4, 0.5]], "looks like xyxy"),
])
def test_target_box_problems(boxes, why):
    problems = target_box_problems([torch.tensor(boxes)])
    assert problems and all(why in w for _kind, w in problems.values())
    if why == "looks like xyxy":
        assert sorted(problems) == [(0, 0), (0, 1)]


def test_valid_cxcywh_boxes_have_no_problems():
    g = torch.Generator().manual_seed(0)
    wh = torch.rand(50, 2, generator=g) * 0.3 + 0.05
    c = wh / 2 + torch.rand(50, 2, generator=g) * (1 - wh)
    assert target_box_problems([torch.cat([c, wh], -1)[:25], torch.cat([c, wh], -1)[25:], torch.zeros(0, 4)]) == {}


def test_image_without_boxes_is_ns204_info_only(replay):
    raw = small()
    raw["targets"][0] = {"boxes": torch.zeros(0, 4), "phrases": []}
    result = run(replay, raw)
    f = one(result, "NS204")
    assert f.severity is Severity.INFO and f.where == ({"image": 0, "caption": "cat . dog ."},)
    assert loud(result) == [] and result.exit_code == 0


# -- NS202 / NS305 / NS301: non-finite weights -------------------------------------------------------

def test_nan_parameter_is_ns305_first_and_trace_names_the_module(replay):
    name = "transformer.decoder.layers.0.linear1.weight"
    with planted(replay, name, set_nan):
        result = run(replay, small(n=1), trace=True)
    assert result.findings[0].code == "NS305"
    f = one(result, "NS305")
    assert f.where == ({"param": name, "module": "transformer.decoder.layers.0.linear1", "nan": 1, "inf": 0,
                        "of": 65536},)
    origin = one(result, "NS301")
    assert origin.where[0]["module"] == "transformer.decoder.layers.0.linear1"
    # Symptoms rank below: boxes, then matching costs (class, from the NaN hidden states).
    codes = [f.code for f in result.findings]
    assert codes.index("NS202") < codes.index("NS203")
    assert "class" in one(result, "NS203").where[0]["term"]


def test_nan_in_bbox_embed_gives_ns202_per_layer_image_and_query(replay):
    with planted(replay, "bbox_embed.0.layers.0.weight", set_nan):
        result = run(replay, small())
    assert result.findings[0].code == "NS305"
    assert {w["param"] for w in one(result, "NS305").where} >= {"bbox_embed.0.layers.0.weight"}
    f = one(result, "NS202")
    # The decoder layer's boxes break; the encoder proposals come from another head and stay finite.
    assert f.where == ({"layer": "dec0", "image": 0, "query": 0, "nonfinite": 900},
                       {"layer": "dec0", "image": 1, "query": 0, "nonfinite": 900})
    assert f.data["per_layer"] == {"enc": [0, 0], "dec0": [900, 900]}
    assert {w["layer"] for w in one(result, "NS203").where} == {"dec0"}


# -- NS303 / NS304: half precision and input images ---------------------------------------------------

def test_weight_scaled_past_fp16_range_is_ns303_naming_the_module(replay):
    name = "transformer.decoder.layers.0.linear1"
    with planted(replay, name + ".weight", lambda t: t.mul_(1e5)):
        result = run(replay, small(n=1))
    assert result.findings[0].code == "NS303"
    f = one(result, "NS303")
    assert f.severity is Severity.WARNING
    assert f.where[0]["module"] == name and f.where[0]["kind"] == "Linear"
    assert f.where[0]["max_abs"] > FP16_MAX and f.where[0]["why"] == "beyond the fp16 range"
    assert "float32" in f.message
    assert loud(result) == ["NS303"]  # finite in fp32: nothing else is wrong


def test_amp_fp16_replay_names_the_module_that_overflows(replay):
    """--amp fp16 on the real model (CPU autocast): the scaled projection overflows to inf in fp16, and
    NS303 ranks above the NaN boxes and costs that follow from it."""
    name = "transformer.decoder.layers.0.cross_attn.value_proj"
    with planted(replay, name + ".weight", lambda t: t.mul_(1e5)):
        result = run(replay, small(n=1), amp="fp16")
    assert result.findings[0].code == "NS303" and result.summary["autocast"] == "fp16"
    f = one(result, "NS303")
    assert f.severity is Severity.ERROR and [w["module"] for w in f.where] == [name]
    assert f.where[0]["dtype"] == "torch.float16"
    assert "NS202" in loud(result)


def test_fp16_overflow_under_autocast_is_an_error_at_its_first_module(replay):
    """module_stats under real CPU autocast on a small stack; the analyzer names where inf starts."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    with torch.no_grad():  # deterministic: relu(0.8 + 1) = 1.8 per unit, then 8 x 1.8 x 1e4 = 1.44e5 > 65504
        model[0].weight.fill_(0.1)
        model[0].bias.fill_(1.0)
        model[2][0].weight.fill_(1e4)
    with torch.autocast("cpu", dtype=torch.float16), module_stats(model, check_inputs=True) as stats:
        model(torch.ones(4, 8))
    rows = stats.result()
    assert {r.name for r in rows if r.new_nonfinite} == {"2.0", "2", ""}  # the child and the parents holding it
    ctx = AnalysisContext(batch=replay.batch, texts=replay.texts, module_stats=rows, autocast_dtype=torch.float16)
    (f,) = half_precision_risk(ctx)
    assert f.severity is Severity.ERROR and f.count == 1  # parents that only contain the overflow are not listed
    assert f.where[0]["module"] == "2.0" and "finite inputs" in f.where[0]["why"]
    assert f.data["autocast"] == "fp16" and f.data["limit"] == FP16_MAX / RISK_FACTOR


def test_under_autocast_only_half_precision_outputs_are_at_risk(replay):
    rows = [ModuleStat("ffn", "Linear", 0, 1, 5e5, 0, "torch.float32"),  # autocast disabled there: safe
            ModuleStat("proj", "Linear", 1, 1, 3e4, 0, "torch.float16")]
    ctx = AnalysisContext(batch=replay.batch, texts=replay.texts, module_stats=rows, autocast_dtype=torch.float16)
    (f,) = half_precision_risk(ctx)
    assert f.severity is Severity.WARNING and [w["module"] for w in f.where] == ["proj"]
    ctx.autocast_dtype = None  # measured in float32: both would be at risk in fp16
    (f,) = half_precision_risk(ctx)
    assert [w["module"] for w in f.where] == ["ffn", "proj"]
    ctx.autocast_dtype = torch.bfloat16
    assert half_precision_risk(ctx) == []


def test_nan_pixel_is_ns304_with_image_and_channel(replay):
    raw = small()
    raw["images"][1, 2, 10, 20] = NAN
    raw["images"][1, 2, 11, 20] = float("inf")
    result = run(replay, raw)
    assert result.findings[0].code == "NS304"
    f = one(result, "NS304")
    assert f.where == ({"image": 1, "channel": 2, "pixels": 2, "value": "nan+inf"},)
    assert f.data["per_image"] == [0, 2]
    assert "NS202" in loud(result)  # the symptoms are there, below it


# -- no false alarms -------------------------------------------------------------------------------

def _healthy(kind: str) -> dict[str, Any]:
    if kind == "demo-seed-5":
        return small(seed=5)
    g = torch.Generator().manual_seed(11)
    if kind == "spans":
        caption = "person . bicycle . traffic light ."
        return {"images": torch.randn(1, 3, 224, 224, generator=g), "captions": [caption],
                "targets": [{"boxes": torch.tensor([[0.3, 0.5, 0.2, 0.6], [0.6, 0.6, 0.4, 0.3], [0.9, 0.1, 0.05, 0.1]]),
                             "tokens_positive": [[[0, 6]], [[9, 16]], [[19, 32]]]}]}
    images = torch.randint(0, 256, (2, 3, 224, 224), generator=g, dtype=torch.uint8)  # uint8: normalized on load
    return {"images": images, "captions": ["dog .", "a dog on a sofa next to a sleeping cat ."],
            "targets": [{"boxes": torch.tensor([[0.5, 0.5, 0.9, 0.9]]), "phrases": ["dog"]},
                        {"boxes": torch.tensor([[0.3, 0.6, 0.3, 0.4], [0.5, 0.7, 0.8, 0.5], [0.7, 0.5, 0.2, 0.2],
                                                [0.2, 0.2, 0.1, 0.1]]),
                         "phrases": ["dog", "sofa", "sleeping cat", "cat"]}]}


@pytest.mark.parametrize("kind", ["demo-seed-5", "spans", "uint8-four-boxes"])
def test_healthy_batches_have_no_errors_or_warnings(replay, kind):
    result = run(replay, _healthy(kind))
    assert loud(result) == [], [(f.code, f.message) for f in result.findings]
    assert result.exit_code == 0 and {f.code for f in result.findings} <= {"NS101"}


# -- options: --select / --ignore, --amp, criterion errors ------------------------------------------

@pytest.mark.parametrize("flag", ["--select", "--ignore"])
def test_cli_unknown_codes_exit_2_and_list_the_valid_ones(demo_files, capsys, flag):
    code = main(["inspect", str(demo_files.checkpoint), str(demo_files.batch), "--config", str(demo_files.config),
                 flag, "NS304,NS999,bogus"])
    err = capsys.readouterr().err
    assert code == 2
    assert "NS999" in err and "BOGUS" in err and "valid codes: NS001, NS101" in err and "NS305" in err


def test_cli_select_and_ignore_filter_findings(replay, demo_files, tmp_path, capsys):
    raw = small()
    raw["images"][0, 1, 0, 0] = NAN
    raw["targets"][1]["boxes"] = torch.tensor([[0.5, 0.5, 0.0, 0.4], [0.2, 0.75, 0.2, 0.15]])
    batch = tmp_path / "batch.pt"
    torch.save(raw, batch)
    base = ["inspect", str(demo_files.checkpoint), str(batch), "--config", str(demo_files.config)]
    out = tmp_path / "select.json"
    assert main(base + ["--select", "ns201,NS304", "--json", str(out)]) == 1
    assert [f["code"] for f in json.loads(out.read_text())["findings"]] == ["NS304", "NS201"]
    out = tmp_path / "ignore.json"
    assert main(base + ["--ignore", "NS304,NS201", "--json", str(out)]) == 1  # the symptoms remain
    codes = [f["code"] for f in json.loads(out.read_text())["findings"]]
    assert codes[:2] == ["NS202", "NS203"] and not {"NS304", "NS201"} & set(codes)
    capsys.readouterr()


def test_amp_must_be_fp16_or_bf16(replay):
    with pytest.raises(InputError, match="fp16, bf16"):
        inspect_replay(replay, amp="fp8")


def test_a_criterion_bug_still_raises_on_a_broken_batch(replay):
    raw = small(n=1)
    raw["images"][0, 0, 0, 0] = NAN
    with pytest.raises(CriterionError, match="boom in user criterion"):
        run(replay, raw, criterion=f"{CRITERIA}:Raises")


def test_findings_are_json_serializable(replay):
    raw = small()
    raw["targets"][0]["boxes"] = torch.tensor([[NAN, 0.4, 0.2, 0.3], [0.7, 0.6, 0.25, 0.35]])
    result = run(replay, raw)
    def no_constants(name: str) -> None:
        raise AssertionError(f"JSON holds {name}")

    back = json.loads(result.to_json(), parse_constant=no_constants)
    assert [f["code"] for f in back["findings"]] == [f.code for f in result.findings]
    assert "NS201" in [f["code"] for f in back["findings"]]
