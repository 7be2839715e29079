"""GRIT-style inputs (webdataset tar shards, parquet files) and the units of work, without Ray: every planted bug
found with its shard and key; damaged inputs are errors naming the shard or file; units read exactly the
lines the whole-file reader reads."""

from __future__ import annotations

import random
import tarfile

import pytest

from _grit_data import BUGS, write_parquet, write_shard
from nanscope.errors import DataError
from nanscope.scan import scan
from nanscope.scan.dataset import iter_chunks, open_dataset
from nanscope.scan.odvg import iter_lines
from nanscope.scan.units import iter_unit, plan


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    from nanscope.stacks.tiny_text import build_vocab

    d = tmp_path_factory.mktemp("te")
    (d / "vocab.txt").write_text("\n".join(build_vocab()) + "\n")
    return BertTokenizerFast.from_pretrained(str(d))


def found(result) -> set[tuple[str, str, str]]:
    """(code, sample id, file) of every hit listed (each planted sample is the only one of its code)."""
    out = set()
    for f in result.findings:
        assert f.data["samples_affected"] == len(f.data["samples"])
        for w in f.where:
            out.add((f.code, str(w["sample"]), w["file"]))
    return out


def test_webdataset_shards_every_bug_with_its_shard_and_key(tmp_path, tokenizer):
    write_shard(tmp_path / "00000.tar", 0, 4)
    write_shard(tmp_path / "00001.tar", 4, 4)
    run = scan(tmp_path, tokenizer=tokenizer)
    assert run.dataset.format == "webdataset" and run.result.summary["samples"] == 8
    shard = {i: "00000.tar" if i < 4 else "00001.tar" for i in range(8)}
    want = {(code, f"{i:09d}", f"{shard[i]}/{i:09d}.png") for i, (code, _, _) in BUGS.items()}
    assert found(run.result) == want
    nb = {f.code: f.data["indices"] for f in run.result.findings}
    assert nb == {code: [i] for i, (code, _, _) in BUGS.items()}  # indices run across the shards


def test_a_missing_image_member_is_ns208(tmp_path, tokenizer):
    write_shard(tmp_path / "00000.tar", 10, 2, image=False)
    codes = {f.code: f.data["samples"] for f in scan(tmp_path / "00000.tar", tokenizer=tokenizer).result.findings}
    assert codes == {"NS208": ["000000010", "000000011"]}


def test_parquet_every_bug_with_its_file_and_key(tmp_path, tokenizer):
    write_parquet(tmp_path / "coyo_0_snappy.parquet", 0, 8)
    run = scan(tmp_path / "coyo_0_snappy.parquet", tokenizer=tokenizer)
    # NS209 needs the image: a parquet file has only the size columns
    want = {(code, f"{i:09d}", f"coyo_0_snappy.parquet:{i}") for i, (code, _, _) in BUGS.items() if code != "NS209"}
    assert found(run.result) == want


def test_a_parquet_file_without_the_columns_names_them(tmp_path, tokenizer):
    write_parquet(tmp_path / "bad.parquet", 0, 3, width=True, noun_chunks=True, ref_exps=True)
    with pytest.raises(DataError, match=r"bad.parquet.*no column width, noun_chunks or ref_exps; it has .*caption"):
        scan(tmp_path / "bad.parquet", tokenizer=tokenizer)


def test_a_truncated_shard_is_an_error_naming_it(tmp_path, tokenizer):
    write_shard(tmp_path / "00000.tar", 0, 6)
    data = (tmp_path / "00000.tar").read_bytes()
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match=r"shard .*cut/00000.tar' cannot be read after key '0000000\d\d'"):
        scan(cut, tokenizer=tokenizer)
    with tarfile.open(tmp_path / "00000.tar") as t:  # the whole one reads: the error is the truncation
        assert len(t.getnames()) == 12


@pytest.mark.parametrize("unit_bytes", [1, 37, 400, 1 << 20])
def test_units_read_exactly_the_lines_of_the_whole_file(tmp_path, unit_bytes):
    rng = random.Random(unit_bytes)
    lines = []
    for _ in range(300):
        lines.append(rng.choice([b"", b"  ", b"\t\r", b'{"a": ' + b"1" * rng.randrange(1, 90) + b"}"]))
    p = tmp_path / "x.jsonl"
    p.write_bytes(b"\n".join(lines) + rng.choice([b"", b"\n"]))
    ds = open_dataset(p, format="odvg")
    want = [(i, n, raw) for i, (n, raw) in enumerate(iter_lines(p))]
    units = plan(ds, unit_bytes=unit_bytes)
    got = [item for u in units for item in iter_unit(ds, u)]
    assert got == want
    assert [u.first_index for u in units] == [sum(u0.samples for u0 in units[:k]) for k in range(len(units))]
    assert units[-1].end == p.stat().st_size
    assert [item for chunk in iter_chunks(ds, (0, 1)) for item in chunk] == want


def test_cli_refuses_what_it_cannot_do(tmp_path, tokenizer, capsys):
    from nanscope.cli import main

    write_shard(tmp_path / "00000.tar", 0, 2)
    te = tmp_path / "te"
    tokenizer.save_pretrained(str(te))
    base = ["scan", str(tmp_path / "00000.tar"), "--text-encoder", str(te), "--quiet"]
    assert main(base + ["--address", "ray://nowhere:1"]) == 2
    assert "--engine ray" in capsys.readouterr().err
    assert main(base + ["--write-clean", str(tmp_path / "clean.tar")]) == 2
    assert "webdataset" in capsys.readouterr().err and not (tmp_path / "clean.tar").exists()
    assert main(base) == 1  # NS201 of sample 1
