"""Issue 27, items 1-5 and 10: outputs through the one atomic writer. Planted and flipped symlinks never
redirect a write onto an input, outputs onto devices are refused, a full disk (a 1 MB tmpfs, else a
file-size limit) and SIGTERM leave each output complete or absent with no temporary file, a full dump
folder is said as such, and --write-clean copies untouched CRLF lines byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from _scan_fixtures import FIX
from nanscope.cli import main
from nanscope.safe_io import TMP_PREFIX

TE = str(FIX / "text_encoder")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def scan_argv(data: Path, *extra: str) -> list[str]:
    return ["scan", str(data), "--label-map", str(FIX / "label_map.json"), "--text-encoder", TE, "--quiet", *extra]


@pytest.fixture()
def od(tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(FIX / "od.jsonl", d / "od.jsonl")
    return d / "od.jsonl"


# ------------------------------------------------------------ 1. planted and flipped symlinks


def test_planted_and_flipped_symlinks_never_redirect_a_write_onto_an_input(od, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    before = sha(od)
    pid = os.getpid()
    for name in ("clean.jsonl", "clean.jsonl.changes.json", "r.json", "r.json.artifacts.pt"):  # the old names
        os.symlink(od, out / f".{name}.tmp-{pid}")
    stop = threading.Event()
    flipped: list[str] = []

    def flip() -> None:  # replace every new temporary file by a symlink to the input, as fast as it can
        while not stop.is_set():
            for entry in os.scandir(out):
                if entry.name.startswith(TMP_PREFIX) and not entry.is_symlink():
                    try:
                        os.unlink(entry.path)
                        os.symlink(od, entry.path)
                        flipped.append(entry.name)
                    except OSError:
                        pass

    t = threading.Thread(target=flip, daemon=True)
    t.start()
    try:
        main(scan_argv(od, "--write-clean", str(out / "clean.jsonl"), "--json", str(out / "r.json")))
    finally:
        stop.set()
        t.join()
    capsys.readouterr()
    assert sha(od) == before and od.stat().st_size > 0  # the input is never truncated, cut or replaced
    for p in out.iterdir():  # every output is the whole file or a link the flipper left, never the input's bytes
        if p.is_file() and not p.is_symlink():
            assert sha(p) != before or p.name.endswith(".jsonl")


def test_output_a_symlink_to_an_input_is_refused_and_the_input_kept(od, tmp_path, capsys):
    link = tmp_path / "clean.jsonl"
    os.symlink(od, link)
    before = sha(od)
    assert main(scan_argv(od, "--write-clean", str(link))) == 2
    assert "never overwrites its inputs" in capsys.readouterr().err
    assert sha(od) == before


# ------------------------------------------------------------ 2. outputs onto special files


@pytest.mark.parametrize("target", ["-", "/dev/stdout", "/dev/stderr", "/dev/null", "/dev/shm/../null"])
def test_outputs_onto_special_files_are_refused(od, tmp_path, capsys, target, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {p: os.lstat(p) for p in ("/dev/stdout", "/dev/null")}
    assert main(scan_argv(od, "--json", target)) == 2
    err = capsys.readouterr().err
    assert target in err and ("standard output" in err or "under /dev" in err), err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in"]  # no file named '-' or '-.artifacts.pt'
    for p, st in before.items():
        assert os.lstat(p).st_ino == st.st_ino and os.path.islink(p) == (p == "/dev/stdout")
    assert not Path("/dev/stdout.artifacts.pt").exists()


# ------------------------------------------------------------ 3. a full disk


@pytest.fixture()
def full_disk(tmp_path):
    """A 1 MB tmpfs filled up (root can mount); None when this machine cannot mount one."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        yield None
        return
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _limited(n: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


def test_a_full_disk_leaves_every_scan_output_complete_or_absent(od, tmp_path, full_disk):
    out = full_disk or tmp_path / "out"
    out.mkdir(exist_ok=True)
    before = sorted(p.name for p in out.iterdir())
    argv = [sys.executable, "-m", "nanscope", *scan_argv(od, "--write-clean", str(out / "clean.jsonl"),
                                                           "--json", str(out / "r.json"))]
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=None if full_disk else _limited(2000))
    assert proc.returncode == 2, proc.stderr
    assert "cannot be written" in proc.stderr and str(out) in proc.stderr
    assert ("no space left" in proc.stderr) if full_disk else ("File too large" in proc.stderr)
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before  # nothing partial, no temporary file


def test_a_full_disk_in_the_dump_folder_is_said_as_such(full_disk):
    if full_disk is None:
        pytest.skip("this machine cannot mount a tmpfs; the file-size limit case is in test_hostile_inputs")
    import torch

    from test_hostile_inputs import _bad_run

    err = _bad_run(torch.nn.Linear(256, 256), full_disk / "nan-dumps")
    assert err.report.step == 2 and err.report.dump is None
    assert "no space left on device" in err.report.dump_error, err.report.dump_error
    assert "enforce fail" not in err.report.dump_error
    assert list((full_disk / "nan-dumps").iterdir()) == []  # the half-written dump was removed


# ------------------------------------------------------------ 4. SIGTERM while writing


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_write_clean_leaves_no_temporary_file(od, tmp_path, sig, code):
    out = tmp_path / "out"
    out.mkdir()
    argv = [sys.executable, "-m", "nanscope", *scan_argv(od, "--write-clean", str(out / "clean.jsonl"))]
    proc = subprocess.Popen(argv, env={**ENV, "NANSCOPE_TEST_PAUSE_WRITE": "60"}, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert line.startswith("nanscope-test: writing"), line + proc.stderr.read()
    assert any(p.name.startswith(TMP_PREFIX) for p in out.iterdir())  # mid-write: the temporaries exist
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == code
    assert list(out.iterdir()) == []  # neither output, no temporary file


# ------------------------------------------------------------ 10. untouched lines byte for byte


def test_write_clean_copies_untouched_crlf_lines_byte_for_byte(tmp_path, capsys):
    src = tmp_path / "od.jsonl"
    lines = (FIX / "od.jsonl").read_bytes().splitlines()
    src.write_bytes(b"".join(x + b"\r\n" for x in lines if x.strip()))
    out = tmp_path / "clean.jsonl"
    res = tmp_path / "r.json"
    main(scan_argv(src, "--write-clean", str(out), "--json", str(res)))
    capsys.readouterr()
    flagged = {s for f in json.loads(res.read_text())["findings"] if f["severity"] != "info"
               for s in f["data"]["samples"]}
    old = src.read_bytes().split(b"\r\n")[:-1]
    new = out.read_bytes()
    assert new.endswith(b"\r\n") and b"\n" not in new.replace(b"\r\n", b"")  # every line ends CRLF
    kept = [x for i, x in enumerate(old) if i not in flagged]
    assert [x for x in new.split(b"\r\n") if x in old] == kept and flagged
