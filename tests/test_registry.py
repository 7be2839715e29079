"""The analyzer registry drives these tests: every registered analyzer runs on every fixture context
(healthy, the demo's long batch, each planted cause, a context without a model) and returns typed
findings with valid codes; duplicate and unknown codes are errors that list the valid ones."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import pytest
import torch

from nanscope.analyzers import AnalysisContext, get, register, registered, run_analyzers
from nanscope.replay.batch import validate_batch
from nanscope.replay.diagnose import build_context, run_trace
from nanscope.errors import UnknownCodeError
from nanscope.findings import CATALOGUE, SCAN_ONLY, Finding, Severity, check_codes
from nanscope.stacks.groundingdino.demo import demo_batch
from nanscope.replay.module_stats import module_stats
from nanscope.replay.positive_map import build_text_info
from nanscope.replay.session import Replay, prepare

from _planting import planted, set_nan

NAN = float("nan")
WATCH_ONLY = {"NS307"}  # AMP loss-scale collapse is seen across steps by nanscope.watch, not in one replay


@pytest.fixture(scope="module")
def replay(demo_files) -> Iterator[Replay]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo model is small; on a shared CI box threads only contend
    try:
        yield prepare(demo_files.checkpoint, demo_files.batch, config=demo_files.config, hash_checkpoint=False)
    finally:
        torch.set_num_threads(threads)


def _small(**plant: Any) -> dict[str, Any]:
    raw = demo_batch(1, long=False)
    raw = {"images": raw["images"].clone(), "captions": raw["captions"], "targets": [dict(t) for t in raw["targets"]]}
    for key, fn in plant.items():
        fn(raw)
    return raw


def _context(replay: Replay, raw: dict[str, Any] | None = None) -> AnalysisContext:
    rep = replay
    if raw is not None:
        b = validate_batch(raw)
        rep = dataclasses.replace(replay, batch=b, texts=build_text_info(replay.model.tokenizer, b))
    with module_stats(rep.model) as stats:
        record = rep.forward()
    ctx = build_context(rep, record)
    ctx.module_stats = stats.result()
    ctx.state_dict = {k: v.clone() for k, v in rep.state_dict.items()}  # survives the restore of a plant
    return ctx


def _with_param(replay: Replay, name: str, fn: Callable[[torch.Tensor], Any], build: Callable[[], Any]) -> Any:
    with planted(replay, name, fn):
        return build()


def _fractional(ctx: AnalysisContext) -> AnalysisContext:
    texts = [dataclasses.replace(t, positive_map=t.positive_map / (t.positive_map.sum(-1, keepdim=True) + 1e-6))
             for t in ctx.texts]
    return dataclasses.replace(ctx, texts=texts)


def _with_loss(ctx: AnalysisContext) -> AnalysisContext:
    return dataclasses.replace(ctx, criterion_name="plain", loss_terms={"loss_ce": torch.tensor(NAN),
                                                                        "loss_bbox": torch.tensor(0.5)},
                               loss_terms_padding_sanitized={"loss_ce": torch.tensor(2.0),
                                                             "loss_bbox": torch.tensor(0.5)})


# fixture name -> the code its plant must raise (None: a fixture without a planted cause)
EXPECTED = {
    "healthy": None, "bare": None, "demo-long": "NS102", "phrase-absent": "NS103", "zero-width-box": "NS201",
    "nan-target-box": "NS203", "nan-pixel": "NS304", "no-boxes": "NS204", "fractional-map": "NS105",
    "nan-bbox-embed": "NS202", "scaled-weight": "NS303", "nan-param-traced": "NS301", "nan-loss": "NS001",
}


@pytest.fixture(scope="module")
def contexts(replay) -> dict[str, AnalysisContext]:
    healthy = _context(replay, _small())
    b = healthy.batch
    out = {
        "healthy": healthy,
        "bare": AnalysisContext(batch=b, texts=healthy.texts),  # no model ran: analyzers needing one are skipped
        "demo-long": _context(replay),
        "phrase-absent": _context(replay, _small(p=lambda r: r["targets"][0].update(phrases=["cat", "moose"]))),
        "zero-width-box": _context(replay, _small(p=lambda r: r["targets"][1]["boxes"].__setitem__((0, 2), 0.0))),
        "nan-target-box": _context(replay, _small(p=lambda r: r["targets"][0]["boxes"].__setitem__((1, 0), NAN))),
        "nan-pixel": _context(replay, _small(p=lambda r: r["images"].__setitem__((0, 1, 3, 3), NAN))),
        "no-boxes": _context(replay, _small(p=lambda r: r["targets"].__setitem__(1, {"boxes": torch.zeros(0, 4),
                                                                                  "phrases": []}))),
        "fractional-map": _fractional(healthy),
        "nan-bbox-embed": _with_param(replay, "bbox_embed.0.layers.0.weight", set_nan,
                                      lambda: _context(replay, _small())),
        "scaled-weight": _with_param(replay, "transformer.decoder.layers.0.linear1.weight", lambda t: t.mul_(1e5),
                                     lambda: _context(replay, _small())),
        "nan-loss": _with_loss(healthy),
    }

    def traced() -> AnalysisContext:
        b1 = validate_batch({k: v[:1] for k, v in _small().items()})
        rep = dataclasses.replace(replay, batch=b1, texts=build_text_info(replay.model.tokenizer, b1))
        ctx = _context(rep)
        ctx.trace = run_trace(rep, "nanscope.criterion:SetCriterion")
        return ctx

    out["nan-param-traced"] = _with_param(replay, "transformer.decoder.layers.0.linear1.weight", set_nan, traced)
    assert set(out) == set(EXPECTED)
    return out


def _check(f: Any, code: str) -> None:
    assert isinstance(f, Finding) and f.code == code and f.code in CATALOGUE
    assert isinstance(f.severity, Severity) and f.count >= 1 and f.message and f.hint
    assert isinstance(f.where, tuple) and all(isinstance(w, Mapping) for w in f.where)

    def no_constants(name: str) -> None:
        raise AssertionError(f"{code}: finding JSON holds {name}")

    json.loads(json.dumps(f.to_dict()), parse_constant=no_constants)
    f.where_text()


@pytest.mark.parametrize("code", sorted(registered()))
def test_every_analyzer_runs_on_every_fixture(contexts, code):
    an = get(code)
    for name, ctx in contexts.items():
        if any(getattr(ctx, n, None) is None for n in an.needs):
            continue
        findings = an.fn(ctx)
        assert isinstance(findings, list), (code, name)
        for f in findings:
            _check(f, code)


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_each_fixture_raises_its_planted_code(contexts, fixture):
    findings = run_analyzers(contexts[fixture])
    codes = [f.code for f in findings]
    expected = EXPECTED[fixture]
    if expected is None:
        assert not [f for f in findings if f.severity is Severity.ERROR], codes
    else:
        assert expected in codes


def test_every_catalogue_code_has_an_analyzer():
    assert set(registered()) == set(CATALOGUE) - WATCH_ONLY - SCAN_ONLY


def test_registering_a_code_twice_raises_and_keeps_the_first():
    before = get("NS101").fn
    with pytest.raises(ValueError, match="NS101 registered twice"):
        register("NS101")(lambda ctx: [])
    assert get("NS101").fn is before


def test_unknown_codes_list_the_valid_ones():
    with pytest.raises(UnknownCodeError, match="add it to findings.CATALOGUE"):
        register("NS999")(lambda ctx: [])
    with pytest.raises(UnknownCodeError, match="analyzers exist for NS001, NS101"):
        get("NS999")
    with pytest.raises(UnknownCodeError, match=r"NS998, NS999; valid codes: NS001, NS101, NS102"):
        check_codes(["ns998", "NS999 ", "ns101"])
    assert check_codes([" ns304", "NS201"]) == ["NS304", "NS201"]


def test_select_and_ignore(contexts):
    ctx = contexts["nan-pixel"]
    assert [f.code for f in run_analyzers(ctx, select=["NS304"])] == ["NS304"]
    codes = [f.code for f in run_analyzers(ctx, ignore=["NS304", "NS202"])]
    assert codes and "NS304" not in codes and "NS202" not in codes and "NS203" in codes


def test_causes_rank_above_symptoms(contexts):
    codes = [f.code for f in run_analyzers(contexts["nan-pixel"])]
    assert codes[0] == "NS304" and codes.index("NS202") < codes.index("NS203")
    codes = [f.code for f in run_analyzers(contexts["nan-param-traced"])]
    assert codes[:2] == ["NS305", "NS301"]
