"""The result JSON: schema, byte-identical output, the artifacts sidecar, and `nanscope report` re-rendering it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from _report_demo import demo_json, inspect_args
from nanscope.cli import main
from nanscope.errors import InputError
from nanscope.findings import Finding, Severity
from nanscope.report.json_io import read_result, result_files, result_schema, sidecar_path, validate_result_dict, write_result
from nanscope.result import SCHEMA, Check, Result


@pytest.fixture(scope="module")
def demo(demo_files, tmp_path_factory) -> Path:
    return demo_json(demo_files, tmp_path_factory)


def test_inspect_twice_gives_byte_identical_json_and_sidecar(demo, demo_files, tmp_path):
    again = tmp_path / "again.json"
    assert main(inspect_args(demo_files, again)) == 1
    assert again.read_bytes() == demo.read_bytes()
    assert sidecar_path(again).read_bytes() == sidecar_path(demo).read_bytes()


def test_json_validates_against_the_shipped_schema(demo):
    schema = result_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    data = json.loads(demo.read_text())
    jsonschema.validate(data, schema, cls=jsonschema.Draft202012Validator)
    assert data["schema"] == SCHEMA == schema["properties"]["schema"]["const"]
    codes = [f["code"] for f in data["findings"]]
    assert {"NS102", "NS101", "NS001", "NS104"} <= set(codes) and codes[0] == "NS104"  # the cause first
    assert data["verdict"] == "broken" and data["exit_code"] == 1
    assert len(data["inputs"]["checkpoint_sha256"]) == 64
    # keys sorted at every level, no timestamps: the text is its own canonical form
    assert demo.read_text() == json.dumps(data, indent=2, sort_keys=True) + "\n"


def test_sidecar_loads_with_weights_only_and_round_trips(demo):
    payload = torch.load(sidecar_path(demo), weights_only=True)
    art = payload["artifacts"]
    summary = json.loads(demo.read_text())["summary"]
    assert art["logits"].shape == (summary["queries"], summary["max_text_len"])
    assert art["text_mask"].dtype == torch.bool and art["image"] == 2
    back = read_result(demo)
    text, blob = result_files(back)
    assert text == demo.read_text() and blob == sidecar_path(demo).read_bytes()
    assert torch.equal(back.artifacts["logits"], art["logits"])


def test_schema_errors_name_the_file_and_field(tmp_path):
    good = Result(kind="inspect", findings=[Finding("NS001", Severity.ERROR, 1, "loss_ce is nan")]).to_dict()
    validate_result_dict(good)
    with pytest.raises(InputError, match=r"'x.json' has schema 'other/9'; expected 'nanscope.result/1'"):
        validate_result_dict(dict(good, schema="other/9"), source="x.json")
    bad = json.loads(json.dumps(good))
    bad["findings"][0]["severity"] = "fatal"
    with pytest.raises(InputError, match=r"'x.json' field findings/0/severity: 'fatal' is not one of"):
        validate_result_dict(bad, source="x.json")
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        read_result(p)


def test_write_result_removes_a_stale_sidecar(tmp_path):
    p = tmp_path / "r.json"
    write_result(Result(kind="inspect", artifacts={"logits": torch.zeros(2, 3), "tokens": ["a"]}), p)
    assert sidecar_path(p).is_file()
    write_result(Result(kind="inspect"), p)
    assert not sidecar_path(p).exists() and read_result(p).artifacts == {}


def test_report_rerenders_from_json_without_the_model(demo, tmp_path, monkeypatch, capsys):
    import nanscope.replay.session

    def no_model(*a, **k):
        raise AssertionError("nanscope report must not load the model")

    monkeypatch.setattr(nanscope.replay.session, "prepare", no_model)
    out, html, junit = tmp_path / "same.json", tmp_path / "r.html", tmp_path / "r.xml"
    code = main(["report", str(demo), "--json", str(out), "--html", str(html), "--junit", str(junit)])
    assert code == 1
    assert out.read_bytes() == demo.read_bytes()  # a re-render writes the same result
    assert sidecar_path(out).read_bytes() == sidecar_path(demo).read_bytes()
    assert "data:image/png;base64," in html.read_text() and junit.read_text().startswith("<?xml")
    assert capsys.readouterr().out.startswith("nanscope inspect: BROKEN")


def _rank_result(rank: int, broken: bool) -> Result:
    findings = [Finding("NS001", Severity.ERROR, 1, "loss_ce is nan", ({"term": "loss_ce"},))] if broken else []
    return Result(kind="inspect", findings=findings, inputs={"rank": rank}, loss_terms={"loss_ce": 1.0})


def test_report_merges_per_rank_results_and_names_the_origin(tmp_path, capsys):
    paths = []
    for rank, broken in ((0, False), (1, True), (2, False)):
        paths.append(tmp_path / f"rank{rank}.json")
        write_result(_rank_result(rank, broken), paths[-1])
    merged = tmp_path / "merged.json"
    assert main(["report", *map(str, reversed(paths)), "--json", str(merged)]) == 1
    data = json.loads(merged.read_text())
    jsonschema.validate(data, result_schema())
    assert data["summary"]["origin_ranks"] == [1]
    assert data["summary"]["ranks"]["1"]["origin"] is True and data["summary"]["ranks"]["0"]["origin"] is False
    assert data["findings"][0]["where"] == [{"rank": 1, "term": "loss_ce"}]
    assert "NS001 error count=1 where=rank 1 term loss_ce | rank 1: loss_ce is nan" in capsys.readouterr().out


def test_report_refuses_to_merge_different_kinds_or_duplicate_ranks(tmp_path, capsys):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    write_result(_rank_result(0, True), a)
    write_result(Result(kind="verify-fix", checks=[Check(1, "finite", True, "ok")]), b)
    write_result(_rank_result(0, False), c)
    assert main(["report", str(a), str(b)]) == 2
    assert "cannot merge results of different kinds (inspect, verify-fix)" in capsys.readouterr().err
    assert main(["report", str(a), str(c)]) == 2
    assert "are both rank 0" in capsys.readouterr().err


def _manifest(folder: Path, rank: int, bad_step: int | None) -> None:
    folder.mkdir(parents=True)
    origin = bad_step is not None
    (folder / "manifest.json").write_text(json.dumps({
        "format": "nanscope-watch-dump", "version": 1, "step": 7, "rank": rank, "world_size": 2,
        "origin": origin, "origin_ranks": [1], "reason": "nonfinite_loss",
        "local_first_bad_step": bad_step, "local_kind": "nonfinite_loss" if origin else None,
        "loss_terms": {"loss_ce": "nan" if origin else 0.5, "loss_bbox": 0.25},
        "nonfinite_terms": ["loss_ce"] if origin else [], "files": {"checkpoint": "checkpoint.pth"},
        "torch": torch.__version__, "device": "cpu",
    }))


def test_report_merges_watch_dumps_and_names_the_origin_rank(tmp_path, capsys):
    _manifest(tmp_path / "dumps" / "step00000007-rank0", 0, None)
    _manifest(tmp_path / "dumps" / "step00000007-rank1", 1, 7)
    out = tmp_path / "watch.json"
    assert main(["report", str(tmp_path / "dumps"), "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    jsonschema.validate(data, result_schema())
    assert data["kind"] == "watch" and data["summary"]["origin_ranks"] == [1]
    assert data["findings"][0]["where"] == [{"rank": 1, "step": 7, "term": "loss_ce"}]
    assert "rank 1 went bad first at step 7" in capsys.readouterr().out
