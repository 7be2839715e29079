"""Issue 27, items 9-10: scan's caption-length bound (a caption past MAX_CAPTION_FACTOR x max_text_len characters
is its own NS104 kind, cut before the tokenizer sees it) and lone surrogates named as data errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from _scan_fixtures import FIX
from nanscope.cli import main
from nanscope.scan.engine import MAX_CAPTION_FACTOR

TE = str(FIX / "text_encoder")


def _vg(tmp_path: Path, caption: str) -> Path:
    lines = [x for x in (FIX / "vg.jsonl").read_text().splitlines() if x.strip()]
    d = json.loads(lines[0])
    d["grounding"]["caption"] = caption
    path = tmp_path / "vg.jsonl"
    path.write_text(json.dumps(d) + "\n" + "\n".join(lines[1:]) + "\n")
    return path


def test_a_caption_too_long_to_tokenize_is_its_own_finding(tmp_path, capsys):
    caption = "a cat next to a dog " + "and a bird " * 200_000  # 2.2e6 characters, 600k tokens
    res = tmp_path / "r.json"
    main(["scan", str(_vg(tmp_path, caption)), "--trainer", "mmdet", "--text-encoder", TE, "--json", str(res),
          "--quiet"])
    capsys.readouterr()
    ns104 = next(f for f in json.loads(res.read_text())["findings"] if f["code"] == "NS104")
    worst = [w for x in ns104["data"]["worst"] for w in x["where"] if w["kind"] == "too long to tokenize"]
    assert ns104["data"]["kinds"]["too long to tokenize"] == 1
    assert worst[0]["sample"] == 0 and worst[0]["characters"] == len(caption) > MAX_CAPTION_FACTOR * 256


def _surrogate_case(tmp_path: Path, case: str, text: str) -> tuple[Path, list[str], str, Any]:
    """A fixture file with `text` (holding a lone surrogate, or U+FFFD in its place) in one text field."""
    if case == "grounding":
        d = json.loads((FIX / "grounding.json").read_text())
        d["images"][0]["caption"] = text
        path = tmp_path / "g.json"
        path.write_text(json.dumps(d))
        return path, [], "images[0].caption", d["images"][0]["id"]
    lines = [json.loads(x) for x in (FIX / "vg.jsonl").read_text().splitlines() if x.strip()]
    if case == "caption":
        lines[1]["grounding"]["caption"] = text
        fld, extra = "grounding.caption", ["--trainer", "mmdet"]
    else:  # a phrase: Open-GroundingDino rebuilds the caption from the phrases
        lines[1]["grounding"]["regions"][0]["phrase"] = text
        fld, extra = "grounding.regions[0].phrase", []
    path = tmp_path / "vg.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return path, extra, fld, 1


@pytest.mark.parametrize("case", ["caption", "phrase", "grounding"])
def test_a_lone_surrogate_is_a_finding_and_the_scan_goes_on(tmp_path, capsys, case):
    """The sample with a lone surrogate is NS210 (error, its field and character), and every other finding is
    the one of the same file with U+FFFD in the surrogate's place."""
    text = "a cat \ud800 next to a dog"
    path, extra, fld, sample_id = _surrogate_case(tmp_path, case, text)
    res = tmp_path / "r.json"
    assert main(["scan", str(path), "--text-encoder", TE, "--quiet", "--json", str(res), *extra]) == 1
    capsys.readouterr()
    got = json.loads(res.read_text())
    [ns210] = [f for f in got["findings"] if f["code"] == "NS210"]
    assert ns210["severity"] == "error" and ns210["count"] == 1 and ns210["hint"]
    [w] = ns210["where"]
    assert (w["sample"], w["field"], w["character"], w["value"]) == (sample_id, fld, text.index("\ud800"), "\\ud800")
    if case != "grounding":
        assert w["line"] == 2
    (tmp_path / "ok").mkdir()
    path2, _, _, _ = _surrogate_case(tmp_path / "ok", case, text.replace("\ud800", "\ufffd"))
    res2 = tmp_path / "r2.json"
    main(["scan", str(path2), "--text-encoder", TE, "--quiet", "--json", str(res2), *extra])
    capsys.readouterr()
    other = [f for f in got["findings"] if f["code"] != "NS210"]
    assert other == json.loads(res2.read_text())["findings"]


def test_without_a_sample_a_lone_surrogate_is_still_a_data_error():
    from nanscope.errors import DataError
    from nanscope.scan.sample import text

    with pytest.raises(DataError, match=r"'f.json' field x holds a lone surrogate '\\udfff' at character 2"):
        text("ab\udfff", "f.json", None, "x")
    bad: list = []
    assert text("ab\udfffc", "f.json", None, "x", bad) == "ab\ufffdc" and bad == [("x", 2, "\\udfff")]


def test_a_line_longer_than_the_limit_is_refused_without_holding_it(tmp_path):
    """Memory stays bounded on any input: a 3 MiB line with a 1 MiB limit is refused after reading 1 MiB of it."""
    from nanscope.errors import DataError
    from nanscope.scan import odvg

    path = tmp_path / "huge.jsonl"
    big = b'{"filename": "a.jpg", "grounding": {"caption": "' + b"a" * (3 << 20) + b'", "regions": []}}\n'
    path.write_bytes(b'{"filename": "b.jpg"}\n' + big + b'{"filename": "c.jpg"}\n')
    got = []
    with pytest.raises(DataError, match=r"line 2 is longer than 1 MiB"):
        for n, raw in odvg.iter_lines(path, max_line=1 << 20):
            got.append((n, len(raw)))
    assert got == [(1, len(b'{"filename": "b.jpg"}\n'))]  # the line before it was read whole
    assert [n for n, _ in odvg.iter_lines(path, max_line=4 << 20)] == [1, 2, 3]  # under a larger limit: every line


def test_a_unit_with_a_line_longer_than_the_limit_is_bounded_too(tmp_path, monkeypatch):
    """`--engine ray`'s units: planning reads one block at a time past a line longer than a unit (no copy of the
    line), and the worker's reader refuses it after MAX_LINE bytes, naming the line; the units around it keep
    their line numbers and sample indices."""
    import tracemalloc

    from nanscope.errors import DataError
    from nanscope.scan import odvg
    from nanscope.scan.dataset import open_dataset
    from nanscope.scan.units import iter_unit, plan

    small = b'{"filename": "a.jpg", "grounding": {"caption": "a cat", "regions": []}}\n'
    big = b'{"filename": "b.jpg", "grounding": {"caption": "' + b"a" * (8 << 20) + b'", "regions": []}}\n'
    path = tmp_path / "huge.jsonl"
    path.write_bytes(small * 3 + b"\n" + big + small * 2)
    ds = open_dataset(path, format="odvg")
    tracemalloc.start()
    units = plan(ds, unit_bytes=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, peak  # a few blocks of 1 MiB, not the 8 MiB line (and its copies)
    assert [(u.first_line, u.first_index, u.samples) for u in units] == [(1, 0, 3), (5, 3, 1), (6, 4, 2)]
    monkeypatch.setattr(odvg, "MAX_LINE", 2 << 20)
    with pytest.raises(DataError, match=r"huge.jsonl' line 5 is longer than 2 MiB"):
        list(iter_unit(ds, units[1]))
    assert [(i, n) for i, n, _ in iter_unit(ds, units[2])] == [(4, 6), (5, 7)]
    monkeypatch.setattr(odvg, "MAX_LINE", 16 << 20)  # under a larger limit the line is read whole
    assert [(i, n, len(raw)) for i, n, raw in iter_unit(ds, units[1])] == [(3, 5, len(big))]
