"""Bad input through the real CLI: one clear message, exit code 2, no traceback, inputs untouched."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import pytest
import torch

from nanscope.cli import main
from nanscope.stacks.groundingdino.demo import demo_batch


def sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


class Evil:
    pass


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, demo_files):
    d = tmp_path_factory.mktemp("bad")
    files = {}
    good = open(demo_files.checkpoint, "rb").read()
    files["truncated"] = d / "truncated.pth"
    files["truncated"].write_bytes(good[: len(good) // 3])
    files["text"] = d / "notes.pth"
    files["text"].write_text("this is not a checkpoint\n")
    files["foreign"] = d / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(1000)}}, files["foreign"])
    files["pickle"] = d / "pickled.pth"
    torch.save({"model": torch.load(demo_files.checkpoint, weights_only=True)["model"], "args": Evil()}, files["pickle"])

    def batch(name, mutate):
        b = demo_batch(0, long=False)
        mutate(b)
        files[name] = d / f"{name}.pt"
        torch.save(b, files[name])

    batch("shape", lambda b: b["targets"][1].__setitem__("boxes", torch.zeros(2, 5)))
    batch("count", lambda b: b["targets"][0].__setitem__("phrases", ["cat"]))
    batch("span", lambda b: (b["targets"][0].pop("phrases"), b["targets"][0].__setitem__("tokens_positive", [[[0, 3]], [[6, 99]]])))
    batch("empty", lambda b: b["captions"].__setitem__(0, ""))
    return files


CASES = [
    ("missing checkpoint", lambda f, d: ["/nonexistent/ck.pth", str(d.batch)], "does not exist"),
    ("missing batch", lambda f, d: [str(d.checkpoint), "/nonexistent/b.pt"], "does not exist"),
    ("truncated", lambda f, d: [str(f["truncated"]), str(d.batch)], "not a readable torch file"),
    ("not torch", lambda f, d: [str(f["text"]), str(d.batch)], "not a readable torch file"),
    ("foreign", lambda f, d: [str(f["foreign"]), str(d.batch)], "does not look like a checkpoint"),
    ("pickle", lambda f, d: [str(f["pickle"]), str(d.batch)], "--trust-checkpoint"),
    ("batch shape", lambda f, d: [str(d.checkpoint), str(f["shape"])], "targets[1].boxes has shape [2, 5]; expected [N, 4]"),
    ("phrase count", lambda f, d: [str(d.checkpoint), str(f["count"])], "targets[0].phrases has 1 entries for 2 boxes"),
    ("span outside", lambda f, d: [str(d.checkpoint), str(f["span"])], "outside its caption"),
    ("empty caption", lambda f, d: [str(d.checkpoint), str(f["empty"])], "captions[0] is empty"),
    ("batch as checkpoint", lambda f, d: [str(d.batch), str(d.batch)], "does not look like a checkpoint"),
]


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_message(bad_files, demo_files, capsys, name, argv, message):
    args = argv(bad_files, demo_files)
    hashes = {a: sha(a) for a in args if not a.startswith("/nonexistent")}
    code = main(["inspect", *args, "--config", str(demo_files.config)])
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err
    assert "Traceback" not in captured.err + captured.out
    *progress_lines, error = captured.err.splitlines()  # stages that ended before the error said so
    assert error.startswith("nanscope: error: ") and message in error  # one paragraph
    assert all(re.fullmatch(r"nanscope: .+ in \d+\.\d s", ln) for ln in progress_lines), progress_lines
    assert {a: sha(a) for a in hashes} == hashes  # inputs untouched



def test_bad_input_in_a_real_process_writes_one_line_to_stderr(bad_files, demo_files):
    """The whole stderr of `python -m nanscope` (file descriptor 2, not sys.stderr): no progress bar, warning
    or other text around the message. The foreign state dict fails after the text encoder was loaded, which
    is where transformers 5 draws its "Loading weights" bar."""
    argv = [sys.executable, "-m", "nanscope", "inspect", str(bad_files["foreign"]), str(demo_files.batch),
            "--config", str(demo_files.config)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "does not look like a checkpoint" in proc.stderr
    # the plain progress lines of the stages that finished (off a terminal), then one paragraph
    rest = [ln for ln in proc.stderr.splitlines() if not re.fullmatch(r"nanscope: [^:]+ in \d+\.\d s", ln)]
    assert len(rest) == 1 and rest[0].startswith("nanscope: error: "), proc.stderr
    assert proc.stderr.endswith("\n") and "\r" not in proc.stderr, proc.stderr

def test_pickle_loads_with_trust_flag(bad_files, demo_files, capsys):
    code = main(["inspect", str(bad_files["pickle"]), str(demo_files.batch), "--config", str(demo_files.config),
                 "--trust-checkpoint", "--select", "NS306"])
    assert code == 0, capsys.readouterr().err


def test_cuda_without_cuda(demo_files, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["inspect", str(demo_files.checkpoint), str(demo_files.batch), "--config", str(demo_files.config),
                 "--device", "cuda"])
    assert code == 2 and "no CUDA device" in capsys.readouterr().err


def test_unwritable_output_and_output_over_input(demo_files, tmp_path, capsys):
    code = main(["inspect", str(demo_files.checkpoint), str(demo_files.batch), "--config", str(demo_files.config),
                 "--json", "/nonexistent-dir/r.json"])
    assert code == 2 and "folder '/nonexistent-dir' does not exist" in capsys.readouterr().err
    before = sha(demo_files.batch)
    code = main(["inspect", str(demo_files.checkpoint), str(demo_files.batch), "--config", str(demo_files.config),
                 "--json", str(demo_files.batch)])
    assert code == 2 and "one of the input files" in capsys.readouterr().err
    assert sha(demo_files.batch) == before


def test_usage_error_is_exit_2_through_the_console_script():
    r = subprocess.run([sys.executable, "-m", "nanscope.cli", "inspect"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr
