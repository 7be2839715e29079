"""A new user's first hour (issue 26): the CLI's own words must be usable as they are printed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from nanscope.cli import build_parser, main


def test_version_flag_prints_the_installed_version():
    from importlib.metadata import version

    proc = subprocess.run([sys.executable, "-m", "nanscope", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"nanscope {version('nanscope')}"


def test_verify_fix_help_describes_every_check(capsys):
    from nanscope.verify import checks

    with pytest.raises(SystemExit):
        main(["verify-fix", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # the checks the module docstring numbers 1..10, each must be named in --help by its number
    numbered = [m.group(1) for line in checks.__doc__.splitlines() if (m := re.match(r"(\d+)\. ", line))]
    assert numbered == [str(i) for i in range(1, 11)]
    for i in range(1, 11):
        assert f"({i})" in text, f"check {i} is not described in verify-fix --help"


def _dollar_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("$ nanscope ")]


@pytest.mark.parametrize("stack", ["groundingdino-py"])
def test_demo_prints_commands_that_paste(tmp_path, capsys, stack):
    out = tmp_path / "a-rather-long-folder-name-so-that-the-paths-pass-eighty-columns" / "demo"
    code = main(["demo", "--out", str(out), "--no-html", "--no-verify", "--quiet", "--stack", stack])
    assert code in (0, 1)
    lines = _dollar_lines(capsys.readouterr().out)
    assert lines, "the demo printed no command"
    for line in lines:
        assert len(line) > 80  # the case that used to be wrapped
        argv = shlex.split(line[2:])[1:]
        args = build_parser().parse_args(argv)  # a wrapped line fails here: "expected one argument"
        assert args.checkpoint.startswith(str(out)) and args.batch.startswith(str(out))
        if args.command == "inspect":
            assert args.criterion == "nanscope.criterion:NaiveCriterion"
            assert args.config and args.config.startswith(str(out))
