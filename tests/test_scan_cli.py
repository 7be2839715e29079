"""`nanscope scan` through the real CLI: exit codes, bad inputs, reports, --write-clean, --batch-out -> inspect,
--shard + `nanscope report` merge."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from nanscope.cli import main

from _scan_fixtures import FIX, load_maker

TE = str(FIX / "text_encoder")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """The fixture images (the script writes them; binary files are not committed)."""
    out = tmp_path_factory.mktemp("scan_fixtures")
    load_maker().build(out)
    return str(out / "images")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def scan_cli(*args: str) -> int:
    return main(["scan", *args, "--text-encoder", TE, "--quiet"])


def test_exit_codes_and_json_schema(tmp_path, capsys):
    import jsonschema

    from nanscope.report.json_io import result_schema

    before = {p: sha(p) for p in FIX.glob("*.json*")}
    out = tmp_path / "r.json"
    assert scan_cli(str(FIX / "vg.jsonl"), "--json", str(out), "--html", str(tmp_path / "r.html"),
                    "--junit", str(tmp_path / "j.xml")) == 1
    d = json.loads(out.read_text())
    jsonschema.Draft202012Validator(result_schema()).validate(d)
    assert d["kind"] == "scan" and d["exit_code"] == 1
    ns106 = next(f for f in d["findings"] if f["code"] == "NS106")
    assert ns106["data"]["samples"] == [1, 2] and ns106["where"][0]["sample"] in (1, 2)
    html = (tmp_path / "r.html").read_text()
    assert "<script" not in html.lower() and html.count("data:image/png;base64,") == 4
    assert "NS106" in html and 'id="dataset"' in html
    xml = (tmp_path / "j.xml").read_text()
    # 5: the VG line without regions is an NS204 error under Open-GroundingDino's rules (its loader raises)
    assert 'failures="5"' in xml and "NS106" in xml
    text = capsys.readouterr().out
    assert re.search(r"^NS106 error samples=2 \(18\.2%\) count=2 worst=1, 2$", text, re.M), text
    assert {p: sha(p) for p in FIX.glob("*.json*")} == before
    # A file with no data bug of error severity exits 0.
    clean = tmp_path / "clean.jsonl"
    clean.write_text((FIX / "vg.jsonl").read_text().splitlines()[0] + "\n")
    assert scan_cli(str(clean)) == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert scan_cli(str(empty)) == 0  # an empty ODVG file: no samples, nothing wrong


def _bad(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("case", ["malformed", "bbox3", "no-label-map", "label-map-missing", "coco-bbox", "format",
                                  "clean-shard"])
def test_bad_inputs_exit_2_naming_file_line_and_field(tmp_path, capsys, case):
    good = (FIX / "od.jsonl").read_text().splitlines()
    lm = str(FIX / "label_map.json")
    if case == "malformed":
        p = _bad(tmp_path, "m.jsonl", "\n".join(good[:3] + ['{"filename": "x.png", "detection": {'] + good[3:5]) + "\n")
        args, want = [str(p), "--label-map", lm], [r"'.*m\.jsonl' line 4 is not valid JSON"]
    elif case == "bbox3":
        d = json.loads(good[1])
        d["detection"]["instances"][1]["bbox"] = [1, 2, 3]
        p = _bad(tmp_path, "b.jsonl", "\n".join([good[0], json.dumps(d)]) + "\n")
        args, want = [str(p), "--label-map", lm], [r"line 2 field detection\.instances\[1\]\.bbox is \[1, 2, 3\] \(3 values\)",
                                                   r"expected 4 numbers \[x1, y1, x2, y2\]"]
    elif case == "no-label-map":
        args, want = [str(FIX / "od.jsonl")], [r"line 1 is a detection \(OD\) line; pass its label map with --label-map"]
    elif case == "label-map-missing":
        args, want = [str(FIX / "od.jsonl"), "--label-map", str(tmp_path / "nope.json")], [r"label map .*nope\.json' does not exist"]
    elif case == "coco-bbox":
        doc = json.loads((FIX / "coco.json").read_text())
        doc["annotations"][3]["bbox"] = [1, 2, 3]
        p = _bad(tmp_path, "c.json", json.dumps(doc))
        args, want = [str(p)], [r"c\.json' field annotations\[3\]\.bbox is \[1, 2, 3\] \(3 values\); expected 4 numbers \[x, y, width, height\]"]
    elif case == "clean-shard":
        args, want = [str(FIX / "vg.jsonl"), "--write-clean", str(tmp_path / "c.jsonl"), "--shard", "0/2"], [
            r"--write-clean writes a copy of the whole dataset; run it without --shard"]
    else:
        args, want = [str(FIX / "coco.json"), "--format", "odvg"], [r"coco\.json' line 1 is not valid JSON|holds a JSON"]
    assert scan_cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    for w in want:
        assert re.search(w, err), err


def _rescan(path: Path, *extra: str) -> dict:
    out = path.with_suffix(".r.json")
    scan_cli(str(path), "--json", str(out), *extra)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name,extra", [("od.jsonl", ["--label-map", str(FIX / "label_map.json")]), ("coco.json", []),
                                        ("vg.jsonl", []), ("grounding.json", []), ("vg.jsonl", ["--trainer", "mmdet"])])
def test_write_clean_rescans_clean_and_differs_only_where_reported(tmp_path, images, name, extra):
    src = FIX / name
    before = sha(src)
    out = tmp_path / ("clean" + src.suffix)
    res = tmp_path / "r.json"
    opts = [*extra, "--images", images]
    scan_cli(str(src), "--json", str(res), "--write-clean", str(out), *opts)
    assert sha(src) == before and out.is_file()
    report = json.loads(res.read_text())
    flagged = {s for f in report["findings"] if f["severity"] != "info" for s in f["data"]["samples"]}
    after = _rescan(out, *opts)
    assert [f["code"] for f in after["findings"] if f["severity"] != "info"] == []
    changes = json.loads(Path(f"{out}.changes.json").read_text())["changes"]
    assert {c["sample"] for c in changes} == flagged
    if src.suffix == ".jsonl":
        old = [x for x in src.read_text().splitlines() if x.strip()]
        new = out.read_text().splitlines()
        unchanged = [x for i, x in enumerate(old) if i not in flagged]
        assert [x for x in new if x in old] == unchanged  # every line not reported is copied byte for byte
        split = sum(int(re.match(r"split into (\d+)", c["action"]).group(1)) - 1 for c in changes
                    if c["action"].startswith("split"))
        dropped = sum(1 for c in changes if c["action"] == "dropped the sample")
        assert len(new) == len(old) + split - dropped
    else:
        a, b = json.loads(src.read_text()), json.loads(out.read_text())
        gone = {x["id"] for x in a["annotations"]} - {x["id"] for x in b["annotations"]}
        by_id = {x["id"]: x["image_id"] for x in a["annotations"]}
        assert {by_id[i] for i in gone} <= flagged
        same = [x for x in a["annotations"] if x["image_id"] not in flagged]
        assert all(x in b["annotations"] for x in same)


def test_shards_merged_equal_a_single_run(tmp_path, images):
    args = [str(FIX / "od.jsonl"), "--label-map", str(FIX / "label_map.json"), "--images", images]
    single = tmp_path / "all.json"
    scan_cli(*args, "--json", str(single))
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"shard{i}.json")
        scan_cli(*args, "--shard", f"{i}/3", "--json", str(shards[-1]))
    merged = tmp_path / "merged.json"
    assert main(["report", *map(str, shards), "--json", str(merged)]) == 1
    a, b = json.loads(single.read_text()), json.loads(merged.read_text())
    for key in ("findings", "summary", "tables", "verdict", "exit_code"):
        assert a[key] == b[key], key
    parts = [json.loads(p.read_text())["summary"]["samples"] for p in shards]
    assert parts == [5, 5, 4] and sum(parts) == a["summary"]["samples"]
    assert main(["report", str(shards[0]), str(shards[0])]) == 2  # one shard twice is refused


def test_batch_out_then_inspect_reproduces_the_finding(tmp_path, demo_files, images):
    """The 90-category sample (id 8) loses 5 boxes past max_text_len: inspect of the written batch on the demo
    model names the same boxes (NS103) and the same truncated tokens (NS102)."""
    lm = str(FIX / "label_map.json")
    res, batch = tmp_path / "scan.json", tmp_path / "batch.pt"
    assert scan_cli(str(FIX / "od.jsonl"), "--label-map", lm, "--json", str(res), "--batch-out", str(batch),
                    "--ids", "8", "--images", images, "--image-size", "224") == 1
    scan = json.loads(res.read_text())
    ns103 = next(f for f in scan["findings"] if f["code"] == "NS103")
    scan_phrases = sorted(w["phrase"] for w in ns103["where"] if w["sample"] == 8)
    assert len(scan_phrases) == min(ns103["count"], 3)
    ns102 = next(f for f in scan["findings"] if f["code"] == "NS102")
    out = tmp_path / "inspect.json"
    code = main(["inspect", str(demo_files.checkpoint), str(batch), "--config", str(demo_files.config),
                 "--select", "NS102,NS103,NS104", "--json", str(out)])  # the text codes: no module-stats pass
    assert code == 1
    ins = json.loads(out.read_text())
    f103 = next(f for f in ins["findings"] if f["code"] == "NS103")
    f102 = next(f for f in ins["findings"] if f["code"] == "NS102")
    assert f103["count"] == ns103["count"] == 5 and f102["count"] == ns102["count"] == 10
    assert all(w["image"] == 0 for w in f103["where"])  # sample 8 is the batch's image
    assert set(scan_phrases) <= {w["phrase"] for w in f103["where"]}
    scan_tokens = {t for w in ns102["where"] if w["sample"] == 8 for t in w["tokens"]}
    inspect_tokens = {t for w in f102["where"] for t in w["tokens"]}
    assert scan_tokens <= inspect_tokens and min(inspect_tokens) >= 256
    import torch

    raw = torch.load(batch, weights_only=True)
    assert tuple(raw["images"].shape) == (1, 3, 224, 298) and len(raw["targets"][0]["phrases"]) == 90


def test_batch_out_needs_ids_and_images(tmp_path, capsys, images):
    assert scan_cli(str(FIX / "vg.jsonl"), "--batch-out", str(tmp_path / "b.pt")) == 2
    assert "--batch-out needs --ids" in capsys.readouterr().err
    assert scan_cli(str(FIX / "vg.jsonl"), "--batch-out", str(tmp_path / "b.pt"), "--ids", "77",
                    "--images", images) == 2
    assert "--ids 77 not found" in capsys.readouterr().err


def test_outputs_never_overwrite_the_input(tmp_path, capsys):
    src = tmp_path / "vg.jsonl"
    shutil.copy(FIX / "vg.jsonl", src)
    before = sha(src)
    assert scan_cli(str(src), "--write-clean", str(src)) == 2
    assert sha(src) == before and "one of the input files" in capsys.readouterr().err


def test_a_scan_with_json_output_imports_no_torch(tmp_path):
    """The JSON writer imports torch only for a sidecar: a scan's --json costs no torch import (it cost ~450 MiB
    and seconds before)."""
    import subprocess
    import sys

    code = ("import sys; from nanscope.cli import main; "
            f"rc = main(['scan', {str(FIX / 'vg.jsonl')!r}, '--text-encoder', {TE!r}, '--quiet', "
            f"'--json', {str(tmp_path / 'r.json')!r}]); "
            "print(rc, sorted(m for m in ('torch', 'transformers', 'groundingdino') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[-2] == "1 []", out
    assert json.loads((tmp_path / "r.json").read_text())["kind"] == "scan"
