"""verify-fix with a user's own after-criterion: the verdict separates "the NaN is gone" from "it equals
the reference", check 4 names the closest preset and the normalizer, metrics are not loss terms, the
user's prints stay in their own block, a 4-argument criterion with a 3-argument matcher runs as is."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest

from nanscope.cli import main
from nanscope.report.json_io import result_schema

CRITERIA = Path(__file__).parents[1] / "fixtures" / "criteria" / "trainers.py"


@pytest.fixture(scope="module")
def short(demo_files, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from nanscope.replay.batch import save_batch
    from nanscope.stacks.groundingdino.demo import demo_batch

    folder = tmp_path_factory.mktemp("verify_user")
    raw = demo_batch(0, long=False)
    batch = save_batch(folder / "short.pt", raw)
    return SimpleNamespace(folder=folder, batch=batch, raw=raw, checkpoint=demo_files.checkpoint,
                           config=demo_files.config)


def _run(short: SimpleNamespace, name: str, *extra: str) -> tuple[int, dict, str]:
    out = short.folder / f"{name}.json"
    code = main(["verify-fix", str(short.checkpoint), str(short.batch), "--config", str(short.config),
                 "--steps", "2", "--json", str(out), *extra])
    data = json.loads(out.read_text())
    jsonschema.validate(data, result_schema(), cls=jsonschema.Draft202012Validator)
    return code, data, ""


def test_a_fix_with_another_normalizer_is_fixed_and_check_4_names_it(short, capsys) -> None:
    html = short.folder / "eos.html"
    code, d, _ = _run(short, "eos", "--preset", "hf", "--html", str(html),
                      "--after", f"{CRITERIA}:build_token_criterion(num_classes=2, eos_coef=0.1)")
    stdout = capsys.readouterr().out
    checks = {c["id"]: c for c in d["checks"]}
    assert code == 0 and d["verdict"] == "fixed" and d["exit_code"] == 0, stdout
    assert all(checks[i]["passed"] for i in (1, 2, 3, 8, 9))  # the NaN is gone
    assert not checks[4]["passed"]  # ... and it does not equal the reference: a different normalizer

    # The ratio check 4 explains, computed here from the batch alone: Q queries, 2 images, 4 boxes.
    from nanscope.stacks.groundingdino.stack import load_config

    Q = int(load_config(short.config).num_queries)
    num_pos = sum(len(t["boxes"]) for t in short.raw["targets"])
    num_neg = 2 * Q - num_pos
    terms = {r["term"]: r for r in d["tables"]["terms"]}
    ratio = terms["loss_ce"]["after"] / checks[4]["numbers"]["reference"]["loss_ce"]
    assert ratio == pytest.approx(num_pos / (num_pos + 0.1 * num_neg), rel=1e-5)
    n4 = checks[4]["numbers"]
    eos = "matched queries + 0.1 * unmatched queries"
    assert n4["closest"] == "hf" and n4["normalizers"] == {eos: ["loss_ce"]}
    assert set(n4["presets"]) == {"mmdet", "open-groundingdino", "hf"}  # every preset's distance
    assert f"= {num_pos + 0.1 * num_neg:g} instead of GT boxes = {num_pos}" in checks[4]["detail"]
    detail = d["summary"]["verdict_detail"]
    assert detail.startswith(f"fixed: no non-finite term, differs from the hf reference by loss_ce divided by {eos}")
    first = stdout.splitlines()[0]
    assert first.startswith("nanscope verify-fix: FIXED - ") and eos in first

    # class_error is a metric (no weight_dict entry, no gradient): shown, never checked as a term.
    assert checks[2]["numbers"]["terms"] == 3 and "class_error" not in checks[2]["detail"]
    assert "class_error" not in n4["mismatched"] and "class_error (metric, not a loss term)" in terms
    assert terms["class_error (metric, not a loss term)"]["metric"] is True

    # The criterion's prints are in one labelled block after the report, never between its lines.
    lines = stdout.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("--- printed by your criterion code")))
    end = lines.index("--- end of what your criterion code printed ---")
    printed = [i for i, x in enumerate(lines) if x.startswith("TokenCriterion:")]
    assert printed and all(start < i < end for i in printed) and end == len(lines) - 1
    assert d["user_stdout"].splitlines() == [lines[i] for i in printed]
    page = html.read_text()
    section = page[page.index('id="user-stdout"'):]
    assert section.index("TokenCriterion: loss_ce=") < section.index("</pre>")  # its own section of the HTML


def test_open_gdino_style_criterion_with_a_three_argument_matcher_passes_every_check(short, capsys) -> None:
    code, d, _ = _run(short, "ogd", "--preset", "open-groundingdino",
                      "--before", f"{CRITERIA}:build_open_gdino(masked=False)",
                      "--after", f"{CRITERIA}:build_open_gdino")
    stdout = capsys.readouterr().out
    checks = {c["id"]: c for c in d["checks"]}
    assert code == 0 and "FIXED - 10/10 checks pass" in stdout, stdout
    assert checks[1]["numbers"]["nonfinite_terms"]  # the unmasked variant reproduces the NaN
    assert checks[4]["numbers"]["closest"] in ("open-groundingdino", "hf") and checks[4]["passed"]
    assert checks[7]["numbers"]["compared"] == 2 * 2 and not checks[7]["numbers"].get("skipped")  # 2 layers x 2 images
    terms = {r["term"] for r in d["tables"]["terms"]}
    assert {"loss_ce_interm", "loss_xy (metric, not a loss term)"} <= terms


def test_check_5_uses_before_own_evaluation_when_before_is_already_finite(short) -> None:
    """A criterion that drops -inf with isinf and averages is finite on the padded batch; the stand-in
    logits (-1e4) would not be dropped and would change its mean, so only its own evaluation is right."""
    from nanscope.replay.session import prepare
    from nanscope.user_code import load_criterion
    from nanscope.verify.equivalence import check_valid_only
    from nanscope.verify.pipeline import run_criterion

    replay = prepare(short.checkpoint, short.batch, config=short.config, hash_checkpoint=False)
    crit, name = load_criterion(f"{CRITERIA}:isinf_mean")
    outputs = replay.forward(detach=False, grad=True).to_outputs()
    targets, extras = replay.targets(), replay.criterion_extras()
    run = run_criterion(replay.model, crit, name, outputs, targets, extras)
    assert run.finite
    own = check_valid_only(crit, name, run, outputs, targets, before=run, extras=extras)
    assert own.passed and own.numbers["before_own_evaluation"] and own.numbers["max_rel_diff"] == 0.0
    stand_in = check_valid_only(crit, name, run, outputs, targets, extras=extras)  # the -1e4 assumption
    assert not stand_in.passed and stand_in.numbers["before_valid_only"]["loss_ce"] < run.terms["loss_ce"]
