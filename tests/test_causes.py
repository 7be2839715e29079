"""One cause, once (nanscope.causes): findings grouped by the cause that explains them, matched by location.

The real-model cases plant a cause and derive what it must explain independently: the caption's token
count from the tokenizer, which images' boxes are NaN from a plain forward of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _report_demo import demo_json
from nanscope.causes import RULES, explained, finding_ids, group
from nanscope.findings import CATALOGUE, CodeInfo, Finding, Severity
from nanscope.replay.diagnose import inspect, inspect_replay
from nanscope.result import Result

E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFO
UNMASKED = str(Path(__file__).parents[1] / "fixtures" / "criteria" / "simple.py") + ":unmasked"


def F(code: str, sev: Severity, *where: dict, count: int = 1, **data) -> Finding:
    return Finding(code, sev, count, f"{code} message", tuple(where), data=data)


def shape(groups) -> list[tuple[str, list[str]]]:
    return [(g.cause.code, [f.code for f in g.effects]) for g in groups]


# -- the rules -------------------------------------------------------------------------------------

def test_rules_name_catalogue_codes_and_have_no_cycle():
    edges: dict[str, set[str]] = {}
    for r in RULES:
        assert r.cause in CATALOGUE and r.effect in CATALOGUE and r.cause != r.effect, r
        assert r.why
        edges.setdefault(r.cause, set()).add(r.effect)
    state: dict[str, int] = {}

    def visit(c: str, path: list[str]) -> None:  # depth-first search: a grey node seen again is a cycle
        assert state.get(c) != 1, f"cycle in RULES: {' -> '.join(path + [c])}"
        if state.get(c) == 2:
            return
        state[c] = 1
        for d in sorted(edges.get(c, ())):
            visit(d, path + [c])
        state[c] = 2

    for c in sorted(edges):
        visit(c, [])


def test_location_decides_not_the_code():
    cap = F("NS104", W, {"image": 2, "tokens": 290})
    cut_here = F("NS102", E, {"image": 2, "box": 1, "why": "truncated"})
    assert explained(cap, cut_here) == {0}
    assert explained(cap, F("NS102", E, {"image": 0, "box": 1, "why": "truncated"})) == set()
    assert explained(cap, F("NS102", E, {"image": 2, "box": 1, "why": "masked"})) == set()  # not a cut token
    # Half its locations elsewhere: the caption does not explain it, it stands as its own cause.
    both = F("NS102", E, {"image": 2, "box": 1, "why": "truncated"}, {"image": 0, "box": 0, "why": "truncated"})
    assert shape(group([cap, both])) == [("NS102", []), ("NS104", [])]


def test_chains_lead_to_the_root_and_a_warning_cause_of_an_error_is_an_error():
    cap = F("NS104", W, {"image": 2, "tokens": 290})
    cut = F("NS102", E, {"image": 2, "box": 1, "why": "truncated"})
    empty = F("NS103", E, {"image": 2, "box": 1, "why": "truncated: all 3 token(s) fall past max_text_len=256"})
    cost = F("NS203", W, {"image": 2, "box": 1, "term": "class", "why": "empty positive row: 0/0 for every query"})
    other = F("NS203", W, {"image": 0, "box": 0, "term": "class", "why": "empty positive row: 0/0 for every query"})
    (g, lone) = group([cost, other, empty, cut, cap])
    assert shape([g, lone]) == [("NS104", ["NS102", "NS103", "NS203"]), ("NS203", [])]
    assert g.cause.severity is E and "Reported as an error: it causes NS102, NS103." in g.cause.message
    assert lone.cause is other and lone.cause.severity is W
    # exit code and verdict unchanged: an error existed before grouping, and only then is a cause raised
    r = Result(kind="inspect", findings=[cost, other, empty, cut, cap])
    assert r.exit_code == 1 and r.verdict == "broken"
    assert Result(kind="inspect", findings=[cap, F("NS203", W, {"image": 2, "box": 1, "term": "class"})]).exit_code == 0


def test_a_code_no_rule_names_stands_as_its_own_cause(monkeypatch):
    monkeypatch.setitem(CATALOGUE, "NS901", CodeInfo("NS901", "a code added later", E, "fix it", 9))
    new = F("NS901", E, {"image": 0, "box": 0})
    cut = F("NS102", E, {"image": 0, "box": 0, "why": "truncated"})
    assert shape(group([new, cut])) == [("NS901", []), ("NS102", [])]


def test_the_padding_explains_only_the_terms_it_made_nonfinite():
    pad = F("NS101", E, {"layer": "dec0", "image": 0}, terms=["loss_ce"])
    loss = F("NS001", E, {"term": "loss_ce", "layer": "last"}, {"term": "loss_bbox", "layer": "last"}, count=2)
    assert explained(pad, loss) == {0}
    assert shape(group([pad, loss])) == [("NS101", []), ("NS001", [])]  # loss_bbox is unexplained
    boxes = F("NS202", E, {"layer": "dec0", "image": 0, "query": 3})
    # Together NS101 (loss_ce) and NS202 (loss_bbox) explain both terms: it goes under the one explaining
    # more, ties to the first ranked (NS101, catalogue order 20, before NS202, 40).
    assert shape(group([pad, loss, boxes])) == [("NS101", ["NS001"]), ("NS202", [])]


def test_rank_scope_keeps_merged_ranks_apart():
    r0 = F("NS304", E, {"rank": 0, "image": 1, "channel": 0})
    boxes = F("NS202", E, {"rank": 1, "layer": "dec0", "image": 0, "query": 0})
    assert shape(group([r0, boxes])) == [("NS304", []), ("NS202", [])]
    same = F("NS202", E, {"rank": 0, "layer": "dec0", "image": 0, "query": 0})
    assert shape(group([r0, same])) == [("NS304", ["NS202"])]


def test_the_trace_origin_in_a_weights_module_goes_under_the_weight():
    weight = F("NS305", E, {"param": "transformer.decoder.layers.0.linear1.weight",
                            "module": "transformer.decoder.layers.0.linear1"})
    origin = F("NS301", E, {"phase": "forward", "module": "transformer.decoder.layers.0.linear1", "op": "addmm"})
    elsewhere = F("NS301", E, {"phase": "forward", "module": "transformer.encoder.layers.0", "op": "add"})
    assert shape(group([weight, origin])) == [("NS305", ["NS301"])]
    assert shape(group([weight, elsewhere])) == [("NS305", []), ("NS301", [])]
    in_loss = F("NS301", E, {"phase": "forward", "module": "(loss code)", "op": "div"})
    assert shape(group([in_loss, F("NS202", E, {"layer": "dec0", "image": 0})])) == [("NS301", []), ("NS202", [])]


def test_a_location_rule_beats_a_blanket_one_and_the_padding_explains_the_losss_first_nan():
    """The demo with --trace: the first NaN is in the loss, made from ContrastiveEmbed's -inf padding.
    It goes under the padding (NS101), and the empty-row costs stay under the rows (NS103), though the
    trace origin (ranked first, catalogue order 5) could explain any cost."""
    pad = F("NS101", E, {"layer": "dec0", "image": 0}, terms=["loss_ce"])
    origin = Finding("NS301", E, 1, "NaN first appears in the forward at binary_cross_entropy_with_logits",
                     ({"phase": "forward", "module": "<outside>.NaiveCriterion", "op": "bce"},),
                     data={"origins": [{"inf_from": "full in transformer.decoder.class_embed.0 (ContrastiveEmbed)"}]})
    rows = F("NS103", E, {"image": 2, "box": 1, "why": "phrase not found in the caption"})
    cost = F("NS203", W, {"image": 2, "box": 1, "term": "class", "why": "empty positive row: 0/0 for every query"})
    loss = F("NS001", E, {"term": "loss_ce", "layer": "last"})
    assert shape(group([origin, rows, cost, pad, loss])) == [("NS103", ["NS203"]), ("NS101", ["NS301", "NS001"])]
    elsewhere = Finding("NS301", E, 1, "NaN in the loss", origin.where, data={"origins": [{"inf_from": None}]})
    assert ("NS301", ["NS001"]) in shape(group([elsewhere, pad, loss]))  # not the padding's: it stands alone


def test_grouping_is_idempotent_and_json_round_trips():
    fs = [F("NS203", W, {"image": 2, "box": 1, "term": "class", "why": "empty positive row: 0/0 for every query"}),
          F("NS103", E, {"image": 2, "box": 1, "why": "phrase not found in the caption"}),
          F("NS104", W, {"image": 2}), F("NS204", I, {"image": 0}), F("NS204", I, {"image": 1})]
    once = group(fs)
    assert group([f for g in once for f in g.findings]) == once
    r = Result(kind="inspect", findings=fs)
    text = r.to_json()
    assert Result.from_dict(json.loads(text)).to_json() == text
    ids = [f["id"] for f in json.loads(text)["findings"]]
    assert ids == ["NS103", "NS203", "NS104", "NS204-1", "NS204-2"] == finding_ids(r.findings)


# -- the real model --------------------------------------------------------------------------------

def _check_links(data: dict) -> list[tuple[str, list[str]]]:
    """Every `cause` names a finding listed before it whose own cause is null; the groups, as codes."""
    ids = [f["id"] for f in data["findings"]]
    assert len(set(ids)) == len(ids)
    by_id = {f["id"]: f for f in data["findings"]}
    out: list[tuple[str, list[str]]] = []
    for k, f in enumerate(data["findings"]):
        if f["cause"] is None:
            out.append((f["code"], []))
            continue
        cause = by_id[f["cause"]]
        assert cause["cause"] is None and ids.index(f["cause"]) < k
        assert out[-1][0] == cause["code"]  # listed right under its cause
        out[-1][1].append(f["code"])
    return out


def test_demo_long_caption_is_one_cause_with_its_consequences(demo_files, tmp_path_factory):
    from transformers import AutoTokenizer

    path = demo_json(demo_files, tmp_path_factory)
    data = json.loads(path.read_text())
    batch = torch.load(demo_files.batch, weights_only=True)
    tok = AutoTokenizer.from_pretrained(str(demo_files.text_encoder))
    long = [i for i, c in enumerate(batch["captions"]) if len(tok(c)["input_ids"]) > 256]
    groups = _check_links(data)
    assert groups[0] == ("NS104", ["NS102", "NS103", "NS203"])
    assert groups[1] == ("NS101", ["NS001"])  # the unmasked loss's padding: a second, independent cause
    first = data["findings"][:4]
    assert first[0]["severity"] == "error"  # a warning by default, raised: it causes errors
    for f in first:  # the caption's image is the only one any of them names
        assert {w["image"] for w in f["where"]} == set(long) == {2}
    assert data["exit_code"] == 1 and data["verdict"] == "broken"


def test_nan_pixel_explains_the_boxes_costs_and_loss(fixture_files):
    d = fixture_files.demo
    raw = torch.load(fixture_files.nan_image, weights_only=True)
    from nanscope.replay.session import prepare

    rep = prepare(d.checkpoint, fixture_files.nan_image, config=d.config, hash_checkpoint=False)
    with torch.no_grad():
        boxes = rep.run()["pred_boxes"]  # [B, Q, 4], the model's own output
    nan_images = sorted({int(i) for i in (~torch.isfinite(boxes)).any(-1).any(-1).nonzero().flatten()})
    bad_pixel_images = sorted({int(i) for i in torch.isnan(raw["images"]).flatten(1).any(1).nonzero().flatten()})
    assert bad_pixel_images == [1] and nan_images == [0, 1]  # groundingdino spreads it over the batch
    result = inspect_replay(rep, criterion=UNMASKED)
    groups = shape(result.groups)
    assert groups[0][0] == "NS304"
    assert {"NS202", "NS203", "NS001"} <= set(groups[0][1])
    ns202 = next(f for f in result.findings if f.code == "NS202")
    assert sorted({w["image"] for w in ns202.where}) == nan_images
    assert [c for c, _ in groups if c in ("NS202", "NS203", "NS001")] == []  # none stands on its own


def test_two_independent_causes_give_two(fixture_files):
    raw = torch.load(fixture_files.healthy, weights_only=True)
    raw["targets"][0]["boxes"][0, 2] = 0.0  # image 0 box 0: zero width
    raw["targets"][1] = dict(raw["targets"][1], phrases=["unicorn"] + list(raw["targets"][1]["phrases"][1:]))
    assert "unicorn" not in raw["captions"][1]
    d = fixture_files.demo
    result = inspect(d.checkpoint, validate(raw), config=d.config, criterion="nanscope.criterion:SetCriterion")
    errors = [g for g in result.groups if g.severity is E]
    assert [(g.cause.code, [(w["image"], w["box"]) for w in g.cause.where]) for g in errors] == [
        ("NS103", [(1, 0)]), ("NS201", [(0, 0)])]
    assert [f.code for f in errors[0].effects] == ["NS203"] and errors[1].effects == ()
    assert errors[0].effects[0].where[0]["image"] == 1 and errors[0].effects[0].where[0]["box"] == 0
    assert result.exit_code == 1


def validate(raw: dict):
    from nanscope.replay.batch import validate_batch

    return validate_batch(raw)


@pytest.mark.parametrize("kind", ["inspect", "watch"])
def test_a_clean_result_has_no_causes(kind):
    r = Result(kind=kind)
    assert r.groups == [] and json.loads(r.to_json())["findings"] == []
