"""Issue 27, item 11: user code behind a boundary that holds. A BaseException from a criterion is an error in
that code (exit 2), Ctrl-C stays 130, and `os._exit(0)` in a criterion cannot end nanscope with exit 0 and
no report: with --isolate (the default) the parent decides the exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanscope.cli import main
from nanscope.stacks.groundingdino.demo import demo_batch

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

_HOSTILE = """
import os


class Escape(BaseException):
    pass


def escapes(outputs, targets):
    raise Escape("not an Exception")


def hard_exit(outputs, targets):
    os._exit(0)  # a CI job would go green


def killed(outputs, targets):
    os.kill(os.getpid(), 9)
"""


@pytest.fixture(scope="module")
def small_batch(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("batch") / "batch.pt"
    torch.save(demo_batch(0, long=False), path)
    return path


def _run(demo_files, batch: Path, crit: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "nanscope", "inspect", str(demo_files.checkpoint), str(batch), "--config",
            str(demo_files.config), "--criterion", crit, "--json", str(out), "--quiet", *extra]
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("attr, says", [("escapes", ["BaseException", "Escape", ":10 "]),
                                        ("hard_exit", ["ended the process itself with exit code 0", "--isolate"]),
                                        ("killed", ["killed by signal SIGKILL"])])
def test_a_criterion_cannot_end_nanscope_or_choose_its_exit_code(attr, says, tmp_path, demo_files, small_batch,
                                                                 capsys):
    """In this very process: without the boundary, os._exit/SIGKILL would end the test run itself."""
    crit = tmp_path / "hostile.py"
    crit.write_text(_HOSTILE)
    out = tmp_path / "r.json"
    got = main(["inspect", str(demo_files.checkpoint), str(small_batch), "--config", str(demo_files.config),
                "--criterion", f"{crit}:{attr}", "--json", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert got == 2, err
    assert all(s in err for s in says), err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_without_isolation_os_exit_is_what_the_boundary_cannot_catch(tmp_path, demo_files, small_batch):
    """--no-isolate documents the cost of leaving the boundary: os._exit(0) ends the run with 0 and no report."""
    crit = tmp_path / "hostile.py"
    crit.write_text(_HOSTILE)
    out = tmp_path / "r.json"
    proc = _run(demo_files, small_batch, f"{crit}:hard_exit", out, "--no-isolate")
    assert proc.returncode == 0 and not out.exists()


def test_an_import_that_calls_os_exit_is_refused(tmp_path, demo_files, small_batch, capsys):
    crit = tmp_path / "exits_on_import.py"
    crit.write_text("import os\nos._exit(0)\n")
    got = main(["inspect", str(demo_files.checkpoint), str(small_batch), "--config", str(demo_files.config),
                "--criterion", f"{crit}:anything", "--quiet"])
    err = capsys.readouterr().err
    assert got == 2 and "while being imported" in err, err
