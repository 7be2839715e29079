"""`scan --engine ray` on a local Ray (`ray.init(num_cpus=2)`, started once for the module): the result equals the
single-process scan byte for byte, including line numbers across unit boundaries; a truncated shard and a
worker that dies are listed as units not scanned while the other units' findings stay; --write-clean parts
concatenate to the single-process copy."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from _grit_data import BUGS, odvg_line, write_shard
from nanscope.report.json_io import result_files
from nanscope.scan import scan
from nanscope.scan import ray_engine

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")

LINES_PER_UNIT = 7


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def te(tmp_path_factory) -> str:
    from transformers import BertTokenizerFast

    from nanscope.stacks.tiny_text import build_vocab

    d = tmp_path_factory.mktemp("te")
    (d / "vocab.txt").write_text("\n".join(build_vocab()) + "\n")
    BertTokenizerFast.from_pretrained(str(d)).save_pretrained(str(d))
    return str(d)


def planted_odvg(path: Path) -> tuple[int, set[int], dict[int, int]]:
    """Lines of one byte length, a blank line after every 5th (so line != index + 1); bugs on the first and last
    sample of each unit of LINES_PER_UNIT physical lines (bad and good lines have one length, so the units are
    those of the clean file). Returns (unit bytes, bad indices, index -> line)."""
    from nanscope.scan.dataset import open_dataset
    from nanscope.scan.units import plan

    length = len(odvg_line(0, bad=False)) + 1
    unit_bytes = LINES_PER_UNIT * length

    def write(bad: set[int]) -> dict[int, int]:
        text, line_of = [], {}
        for i in range(60):
            text.append(odvg_line(i, bad=i in bad))
            line_of[i] = len(text)
            if i % 5 == 4:
                text.append(" " * (length - 1))  # a blank line of the same length
        path.write_text("\n".join(text) + "\n")
        return line_of

    write(set())
    units = plan(open_dataset(path, format="odvg"), unit_bytes=unit_bytes)
    bad = {u.first_index for u in units} | {u.first_index + u.samples - 1 for u in units}
    return unit_bytes, bad, write(bad)


def test_ray_equals_one_process_across_unit_boundaries(tmp_path, te):
    data = tmp_path / "vg.jsonl"
    unit_bytes, bad, line_of = planted_odvg(data)
    local = scan(data, text_encoder=te)
    far = scan(data, text_encoder=te, engine="ray", workers=2, unit_bytes=unit_bytes)
    assert far.failed == []
    assert result_files(far.result)[0] == result_files(local.result)[0]  # the JSON, byte for byte
    ns201 = next(f for f in far.result.findings if f.code == "NS201")
    assert set(ns201.data["samples"]) == bad
    assert all(w["line"] == line_of[w["sample"]] for w in ns201.where)
    from nanscope.scan.units import plan

    units = plan(far.dataset, unit_bytes=unit_bytes)
    assert len(units) >= 8 and any(u.first_line != u.first_index + 1 for u in units)


def test_html_and_junit_equal_too(tmp_path, te):
    from nanscope.report.ci import junit_xml
    from nanscope.report.html import render_html

    data = tmp_path / "vg.jsonl"
    unit_bytes, _, _ = planted_odvg(data)
    a = scan(data, text_encoder=te).result
    b = scan(data, text_encoder=te, engine="ray", workers=2, unit_bytes=unit_bytes).result
    assert junit_xml(a) == junit_xml(b)
    assert render_html(a) == render_html(b)


def test_a_truncated_shard_is_listed_and_the_rest_is_kept(tmp_path, te):
    write_shard(tmp_path / "00000.tar", 0, 4)
    write_shard(tmp_path / "00001.tar", 4, 4)
    whole = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(whole[: len(whole) // 2 + 100])
    run = scan(tmp_path, text_encoder=te, engine="ray", workers=2)
    assert [u for u, _ in run.failed] == ["00001.tar"]
    assert "cannot be read after key" in run.failed[0][1]
    assert run.result.summary["units_not_scanned"] == [{"unit": "00001.tar", "why": run.failed[0][1]}]
    assert run.result.summary["samples"] == 4
    assert {f.code: f.data["samples"] for f in run.result.findings} == {"NS201": ["000000001"]}  # shard 0's bug


class _Dying(ray_engine._Scanner):
    def scan(self, unit, clean_dir):
        if unit.number == 1:
            os._exit(1)  # the worker process dies mid-unit
        return super().scan(unit, clean_dir)


def test_a_worker_that_dies_is_listed_and_the_cli_exits_2(tmp_path, te, monkeypatch, capsys):
    import ray.cloudpickle

    from nanscope.cli import main

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(ray_engine, "_Scanner", _Dying)
    data = tmp_path / "vg.jsonl"
    unit_bytes, bad, _ = planted_odvg(data)
    code = main(["scan", str(data), "--text-encoder", te, "--engine", "ray", "--workers", "2",
                 "--unit-mib", str(unit_bytes / (1 << 20)), "--json", str(tmp_path / "r.json"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 2
    assert "1 unit(s) not scanned" in out and "vg.jsonl bytes" in out and "died" in out
    r = json.loads((tmp_path / "r.json").read_text())
    [missing] = r["summary"]["units_not_scanned"]
    assert missing["unit"].startswith(f"vg.jsonl bytes {unit_bytes}-{2 * unit_bytes} ")
    ns201 = next(f for f in r["findings"] if f["code"] == "NS201")
    assert 0 < len(ns201["data"]["samples"]) < len(bad)  # the other units' bugs are all there


def test_write_clean_parts_concatenate_to_the_one_process_copy(tmp_path, te):
    from nanscope.cli import main

    data = tmp_path / "vg.jsonl"
    unit_bytes, _, _ = planted_odvg(data)
    assert main(["scan", str(data), "--text-encoder", te, "--write-clean", str(tmp_path / "one.jsonl"), "--quiet"]) == 1
    assert main(["scan", str(data), "--text-encoder", te, "--engine", "ray", "--workers", "2", "--unit-mib",
                 str(unit_bytes / (1 << 20)), "--write-clean", str(tmp_path / "parts"), "--quiet"]) == 1
    manifest = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert manifest["not_written"] == [] and len(manifest["parts"]) >= 8
    joined = "".join((tmp_path / "parts" / p["file"]).read_text() for p in manifest["parts"])
    assert joined == (tmp_path / "one.jsonl").read_text()
    one = json.loads((tmp_path / "one.jsonl.changes.json").read_text())["changes"]
    assert sum(p["changes"] for p in manifest["parts"]) == len(one)


def test_a_line_past_the_limit_fails_its_unit_naming_the_line(tmp_path, te):
    """A unit's reader bounds a line as a single-process scan does (odvg.MAX_LINE): the unit with the 65 MiB line
    is listed with the line's number, the units around it are scanned."""
    from nanscope.scan.odvg import MAX_LINE

    good = b'{"filename": "a.jpg", "height": 48, "width": 64, "grounding": {"caption": "a cat", "regions": ' \
           b'[{"bbox": [1, 1, 9, 9], "phrase": "a cat", "tokens_positive": [[0, 5]]}]}}\n'
    data = tmp_path / "vg.jsonl"
    with open(data, "wb") as f:
        f.write(good * 4)
        f.write(b'{"filename": "b.jpg", "grounding": {"caption": "' + b"a" * (MAX_LINE + 10) + b'", "regions": []}}\n')
        f.write(good * 3)
    run = scan(data, text_encoder=te, engine="ray", workers=2, unit_bytes=1 << 20)
    [(unit, why)] = run.failed
    assert unit.startswith("vg.jsonl bytes ") and "(lines 5-5)" in unit
    assert "line 5 is longer than 64 MiB" in why
    assert run.result.summary["samples"] == 7


def test_a_lone_surrogate_is_the_same_finding_as_in_one_process(tmp_path, te):
    """NS210 from a Ray unit: the JSON equals the single-process scan's, byte for byte."""
    data = tmp_path / "vg.jsonl"
    unit_bytes, _, _ = planted_odvg(data)
    lines = data.read_text().splitlines()
    d = json.loads(lines[8])
    d["grounding"]["caption"] = "a cat \ud800 on a mat"
    lines[8] = json.dumps(d)
    data.write_text("\n".join(lines) + "\n")
    local = scan(data, text_encoder=te)
    far = scan(data, text_encoder=te, engine="ray", workers=2, unit_bytes=unit_bytes)
    assert far.failed == []
    assert result_files(far.result)[0] == result_files(local.result)[0]
    [ns210] = [f for f in far.result.findings if f.code == "NS210"]
    assert [w["line"] for w in ns210.where] == [9]
