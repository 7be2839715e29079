"""Issue 27, items 9-10: scan's caption-length bound (a caption past MAX_CAPTION_FACTOR x max_text_len characters
is its own NS104 kind, cut before the tokenizer sees it) and lone surrogates named as data errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.parametrize("fmt", ["jsonl", "grounding"])
def test_a_lone_surrogate_is_a_data_error_naming_the_field(tmp_path, capsys, fmt):
    if fmt == "jsonl":
        path, where = _vg(tmp_path, "a cat \ud800 next to a dog"), "line 1 field grounding.caption"
        extra = ["--trainer", "mmdet"]
    else:
        d = json.loads((FIX / "grounding.json").read_text())
        d["images"][0]["caption"] = "a cat \udfff next"
        path, where, extra = tmp_path / "g.json", "field images[0].caption", []
        path.write_text(json.dumps(d))
    assert main(["scan", str(path), "--text-encoder", TE, "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert where in err and "lone surrogate" in err and "internal error" not in err, err
