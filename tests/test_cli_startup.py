"""`nanscope --help` (and each subcommand's) starts without torch, transformers, groundingdino or matplotlib.

benchmarks/startup.py measures the times; this checks the property behind them in a fresh process, so the
help stays fast on the core install and beside any groundingdino provider.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "groundingdino", "matplotlib", "numpy", "scipy")
PROBE = """
import contextlib, io, json, sys
from nanscope.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "help": out.getvalue(), "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["inspect", "--help"], ["verify-fix", "--help"],
                                  ["scan", "--help"], ["report", "--help"], ["codes", "--help"]])
def test_help_imports_no_heavy_module(argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["code"] == 0 and "usage: nanscope" in got["help"]
    assert got["heavy"] == [], f"nanscope {' '.join(argv)} imported {got['heavy']}"
