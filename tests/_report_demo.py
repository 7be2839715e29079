"""The demo inspected once per test session and saved with --json, shared by tests/test_report_*.py.

Not a test module (no `test_` prefix): the report tests import it, and `functools.cache` keeps the
one `nanscope inspect` run for all of them.
"""

from __future__ import annotations

import functools
from pathlib import Path

CRITERION = "nanscope.criterion:NaiveCriterion"  # the unmasked criterion: the demo's loss goes NaN


def inspect_args(demo_files, json_path: Path) -> list[str]:
    return ["inspect", str(demo_files.checkpoint), str(demo_files.batch), "--config", str(demo_files.config),
            "--criterion", CRITERION, "--json", str(json_path)]


@functools.cache
def _run(checkpoint: str, batch: str, config: str, out: str) -> Path:
    from nanscope.cli import main

    args = ["inspect", checkpoint, batch, "--config", config, "--criterion", CRITERION, "--json", out]
    code = main(args)
    assert code == 1, f"the demo must be broken (exit 1), got {code}"
    return Path(out)


def demo_json(demo_files, tmp_path_factory) -> Path:
    """`nanscope inspect DEMO --criterion NaiveCriterion --json r.json`, run once; returns r.json (sidecar beside it)."""
    out = tmp_path_factory.getbasetemp() / "report-demo"
    out.mkdir(exist_ok=True)
    return _run(str(demo_files.checkpoint), str(demo_files.batch), str(demo_files.config), str(out / "r.json"))
