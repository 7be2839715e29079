"""Hostile inputs and faults through the real CLI: nothing is overwritten, nothing is half-written,
bad input exits 2 with one paragraph naming the file and field (README "Reliability")."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _report_demo import demo_json

from nanscope.cli import main
from nanscope.stacks.groundingdino.demo import demo_batch

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def state(folder: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (inode, sha256)} of every file under `folder`: what "unchanged" means here."""
    return {str(f.relative_to(folder)): (f.stat().st_ino, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in sorted(folder.rglob("*")) if f.is_file() and not f.is_symlink()}


@pytest.fixture()
def work(tmp_path, demo_files):
    """A private copy of the demo (config, text encoder, checkpoint, batch), a criterion file and a dump."""
    d = tmp_path / "in"
    shutil.copytree(demo_files.folder, d)
    (d / "crit.py").write_text("from nanscope.criterion import NaiveCriterion as Crit\n")
    dump = d / "dump"
    dump.mkdir()
    shutil.copy(d / "checkpoint.pth", dump / "checkpoint.pth")
    shutil.copy(d / "batch.pt", dump / "batch.pt")
    (dump / "manifest.json").write_text(json.dumps({"format": "nanscope-watch-dump", "step": 3, "rank": 0,
                                                    "config": str(d / "config.json")}))
    return d


def inspect_argv(d: Path, *extra: str) -> list[str]:
    return ["inspect", str(d / "checkpoint.pth"), str(d / "batch.pt"), "--config", str(d / "config.json"), *extra]


def _sidecar_onto_batch(d: Path) -> list[str]:
    """The batch is named like a sidecar; --json r.json would write r.json.artifacts.pt over it."""
    os.rename(d / "batch.pt", d / "r.json.artifacts.pt")
    return ["inspect", str(d / "checkpoint.pth"), str(d / "r.json.artifacts.pt"), "--config", str(d / "config.json"),
            "--json", str(d / "r.json")]


def _linked(d: Path, link, name: str, option: str) -> list[str]:
    """An output path that is a hard link or a symlink to an input."""
    link(d / name, d / "out.any")
    return inspect_argv(d, option, str(d / "out.any"))


OVERWRITES = {
    "junit onto config": lambda d: inspect_argv(d, "--junit", str(d / "config.json")),
    "html onto criterion": lambda d: inspect_argv(d, "--criterion", f"{d / 'crit.py'}:Crit", "--html",
                                                  str(d / "crit.py")),
    "json inside text encoder": lambda d: inspect_argv(d, "--text-encoder", str(d / "text_encoder"), "--json",
                                                       str(d / "text_encoder" / "config.json")),
    "json inside the config's text encoder": lambda d: inspect_argv(d, "--json", str(d / "text_encoder" / "model.safetensors")),
    "json onto dump manifest": lambda d: ["inspect", str(d / "dump"), "--json", str(d / "dump" / "manifest.json")],
    "sidecar onto batch": lambda d: _sidecar_onto_batch(d),
    "hard link to batch": lambda d: _linked(d, os.link, "batch.pt", "--json"),
    "symlink to checkpoint": lambda d: _linked(d, os.symlink, "checkpoint.pth", "--html"),
    "other spelling of batch": lambda d: ["verify-fix", str(d / "checkpoint.pth"), str(d / "batch.pt"), "--config",
                                          str(d / "config.json"), "--junit", str(d / "dump" / ".." / "batch.pt")],
    "two outputs one path": lambda d: inspect_argv(d, "--json", str(d / "out.x"), "--html", str(d / "out.x")),
}


@pytest.mark.parametrize("name", list(OVERWRITES))
def test_no_output_replaces_an_input(work, capsys, name):
    argv = OVERWRITES[name](work)
    before = state(work)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "never overwrites" in err or "its own path" in err, err
    assert state(work) == before  # bytes and inode of every input unchanged, nothing new written


def test_report_refuses_json_onto_its_own_sidecar(demo_files, tmp_path_factory, tmp_path, capsys):
    r = tmp_path / "r.json"
    src = demo_json(demo_files, tmp_path_factory)
    shutil.copy(src, r)
    shutil.copy(f"{src}.artifacts.pt", f"{r}.artifacts.pt")
    before = state(tmp_path)
    assert main(["report", str(r), "--json", f"{r}.artifacts.pt"]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert main(["report", str(r), str(tmp_path / "." / "r.json")]) == 2  # one file is not two ranks
    assert "are the same file" in capsys.readouterr().err
    assert state(tmp_path) == before


def test_demo_refuses_a_folder_with_foreign_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "own config"}\n')
    before = state(out)
    assert main(["demo", "--out", str(out), "--no-verify", "--no-html", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "config.json" in err
    assert state(out) == before


def test_demo_reuses_its_own_folder_but_not_once_a_file_changed(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-verify", "--no-html", "--quiet"]) == 0
    from nanscope.cli.demo import check_demo_folder

    check_demo_folder(out)  # everything in it was written by the demo: a rerun may replace it
    (out / "checkpoint.pth").write_bytes(b"the user's own weights")
    before = state(out)
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--no-verify", "--no-html", "--quiet"]) == 2
    assert "checkpoint.pth" in capsys.readouterr().err
    assert state(out) == before


# ---------------------------------------------------------------- faults while writing


def _report(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanscope", "report", *argv, "--quiet"], env={**ENV, **kw.pop("env", {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture()
def saved(demo_files, tmp_path_factory, tmp_path):
    """A result pair to re-render, and an older pair at the output path that must survive any fault."""
    src = demo_json(demo_files, tmp_path_factory)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("old.json", "old.json.artifacts.pt"):
        (out / name).write_bytes(b"previous run\n")
    (out / "report.html").write_bytes(b"<p>previous report</p>\n")
    return src, out


def _size_limit(n: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


def test_file_size_limit_leaves_previous_outputs_and_no_partial_file(saved):
    src, out = saved
    before = state(out)
    html_size = 40_000  # the report's HTML and sidecar are far larger: the write fails midway
    proc = _report([str(src), "--html", str(out / "report.html"), "--json", str(out / "old.json")],
                   preexec_fn=_size_limit(html_size))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "File too large" in err and "nothing was written there" in err
    assert state(out) == before  # the previous files are whole, no temporary file is left
    proc = _report([str(src), "--html", str(out / "report.html")], preexec_fn=_size_limit(html_size))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "report.html" in err, err
    assert state(out) == before


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_the_write_leaves_no_partial_output(saved, sig, code):
    src, out = saved
    before = state(out)
    proc = _report([str(src), "--json", str(out / "old.json")], env={"NANSCOPE_TEST_PAUSE_WRITE": "60"})
    line = proc.stderr.readline()
    assert line.startswith("nanscope-test: writing"), line + proc.stderr.read()
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == code
    assert state(out) == before


def test_report_refuses_a_torn_pair(demo_files, tmp_path_factory, tmp_path, capsys):
    src = demo_json(demo_files, tmp_path_factory)
    r = tmp_path / "r.json"
    shutil.copy(src, r)
    side = Path(f"{r}.artifacts.pt")
    payload = torch.load(f"{src}.artifacts.pt", weights_only=True)
    payload["artifacts"]["image"] = 0  # another run's figures
    torch.save(payload, side)
    assert main(["report", str(r)]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "SHA-256" in err
    side.write_bytes(b"")  # a sidecar left at 0 bytes
    assert main(["report", str(r)]) == 2
    assert "does not match" in capsys.readouterr().err
    side.unlink()
    assert main(["report", str(r)]) == 2
    assert "does not exist" in capsys.readouterr().err
    shutil.copy(f"{src}.artifacts.pt", side)  # the right sidecar: accepted
    assert main(["report", str(r), "--quiet"]) == 1


def test_two_runs_writing_one_path_leave_one_runs_pair(demo_files, tmp_path_factory, tmp_path, capsys):
    from nanscope.report.json_io import read_result, write_result

    a = demo_json(demo_files, tmp_path_factory)
    other = read_result(a)
    other.artifacts["image"] = 0  # a second run: another verdict's figures
    other.summary["run"] = "b"
    b = tmp_path / "b.json"
    write_result(other, b)
    out = tmp_path / "out.json"
    procs = [_report([str(src), "--json", str(out)], env={"NANSCOPE_TEST_PAUSE_WRITE": "0.5"}) for src in (a, b)]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 1
    assert main(["report", str(out), "--quiet"]) == 1  # the pair on disk matches itself
    back = read_result(out)
    assert (back.summary.get("run"), back.artifacts["image"]) in {(None, 2), ("b", 0)}


# ---------------------------------------------------------------- bad input: exit 2, the file and field named


def _batch(d: Path, name: str, mutate) -> str:
    b = demo_batch(0, long=False)
    mutate(b)
    torch.save(b, d / name)
    return str(d / name)


def _dump(d: Path, name: str, manifest) -> str:
    dump = d / name
    dump.mkdir()
    shutil.copy(d / "checkpoint.pth", dump / "checkpoint.pth")
    shutil.copy(d / "batch.pt", dump / "batch.pt")
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (dump / "manifest.json").write_text(text)
    return str(dump)


def _ranks(d: Path, rank: int) -> str:
    top = d / "dumps"
    for r in (0, rank):
        m = {"format": "nanscope-watch-dump", "step": 4, "rank": r, "world_size": 2, "local_first_bad_step": 4,
             "local_kind": "nonfinite_loss"}
        (top / f"step00000004-rank{r}").mkdir(parents=True)
        (top / f"step00000004-rank{r}" / "manifest.json").write_text(json.dumps(m))
    return str(top)


def _deep(d: Path) -> str:
    (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    return str(d / "deep.json")


M = {"format": "nanscope-watch-dump", "step": 3, "rank": 0}
BAD = {
    "image below 64x64": (lambda d: inspect_argv(d)[:2] + [_batch(d, "small.pt", lambda b: b.__setitem__(
        "images", b["images"][:, :, :32, :32]))], "images are 32x32 pixels; the model needs at least 64x64"),
    "image above the size limit": (lambda d: inspect_argv(d)[:2] + [_batch(d, "huge.pt", lambda b: b.__setitem__(
        "images", torch.zeros(1, 3, 2100, 2100, dtype=torch.uint8)))], "above the limit of 2048 pixels a side"),
    "more pixels than memory": (lambda d: inspect_argv(d)[:2] + [_batch(d, "many.pt", lambda b: b.__setitem__(
        "images", torch.zeros(1, 3, 64, 64, dtype=torch.uint8).expand(2**18, 3, 64, 64)))],  # a stride-0 view: 12 KB
        "expanded with stride 0 from 12288 stored elements"),  # refused on load, before any estimate or pass
    "no images": (lambda d: inspect_argv(d)[:2] + [_batch(d, "b0.pt", lambda b: b.update(
        images=b["images"][:0], captions=[], targets=[]))], "no images"),
    "box holding a string": (lambda d: inspect_argv(d)[:2] + [_batch(d, "str.pt", lambda b: b["targets"][0].__setitem__(
        "boxes", [[0.5, 0.5, "wide", 0.1], [0.2, 0.2, 0.1, 0.1]]))], "targets[0].boxes is [[0.5, 0.5, 'wide'"),
    "reversed span": (lambda d: inspect_argv(d)[:2] + [_batch(d, "rev.pt", lambda b: (b["targets"][0].pop("phrases"),
        b["targets"][0].__setitem__("tokens_positive", [[[9, 6]], [[0, 3]]])))],
        "targets[0].tokens_positive[0][0] is [9, 6], reversed"),
    "device as batch": (lambda d: inspect_argv(d)[:2] + ["/dev/null"], "'/dev/null' is not a regular file"),
    "device as checkpoint": (lambda d: ["inspect", "/dev/null", str(d / "batch.pt")],
                             "checkpoint '/dev/null' is not a regular file"),
    "manifest not JSON": (lambda d: ["inspect", _dump(d, "d1", "{not json")], "is not readable JSON"),
    "manifest a list": (lambda d: ["inspect", _dump(d, "d2", "[1, 2]")], "has format None"),
    "amp not a dict": (lambda d: ["inspect", _dump(d, "d3", {**M, "amp": "fp16"})], "field 'amp' is a JSON str"),
    "step not an integer": (lambda d: ["inspect", _dump(d, "d4", {**M, "step": "three"})], "field 'step' is 'three'"),
    "rank 200000000": (lambda d: ["report", _ranks(d, 200_000_000)], "field 'rank' is 200000000, not below"),
    "text encoder /etc": (lambda d: inspect_argv(d, "--text-encoder", "/etc"), "--text-encoder '/etc' is a folder"),
    "deeply nested report JSON": (lambda d: ["report", _deep(d)], "nests 100000 levels deep"),
    "deeply nested manifest": (lambda d: ["inspect", _dump(d, "d5", "[" * 100_000 + "]" * 100_000)],
                               "nests too deeply to be a watch dump manifest"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_exits_2_naming_the_field(work, capsys, name):
    argv, message = BAD[name]
    args = argv(work)
    if args[0] == "inspect" and len(args) == 3:
        args += ["--config", str(work / "config.json")]
    code = main([*args, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanscope: error: ") and len(lines[0]) < 600, err
    assert message in lines[0], err


def test_half_precision_checkpoint_is_noted_as_upcast(work, capsys):
    state = torch.load(work / "checkpoint.pth", weights_only=True)
    half = {"model": {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}}
    torch.save(half, work / "fp16.pth")
    code = main(["inspect", str(work / "fp16.pth"), str(work / "batch.pt"), "--config", str(work / "config.json"),
                 "--quiet", "--json", str(work / "r.json")])
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "note: the checkpoint's weights are float16; nanscope replayed them upcast to float32" in out
    assert json.loads((work / "r.json").read_text())["inputs"]["checkpoint_dtypes"] == ["float16"]
    capsys.readouterr()
    assert main(["report", str(work / "r.json"), "--quiet"]) in (0, 1)  # the note survives the JSON
    assert "replayed them upcast" in capsys.readouterr().out
