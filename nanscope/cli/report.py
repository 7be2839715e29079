"""`nanscope report RESULT.json [RESULT2.json ...]`: re-render saved results without re-running the model.

Reads each JSON and its sidecar `RESULT.json.artifacts.pt` (the figures' tensors); several per-rank
results, or watch dumps, merge into one summary that names the origin rank. Prints the terminal
report, writes --html/--junit/--json/--github like inspect, and exits with the result's code.
"""

from __future__ import annotations

import argparse
from typing import Any

NAME = "report"


def register(subparsers: Any) -> None:
    from nanscope.cli._common import quiet_option

    p = subparsers.add_parser(
        NAME, help="re-render saved results (--json files) or merge per-rank results / watch dumps",
        description="Re-render results written with --json (and their .artifacts.pt sidecars) without the model. "
                    "Several per-rank results or watch dump folders merge into one summary naming the origin rank.")
    p.add_argument("results", nargs="+", metavar="RESULT",
                   help="a result JSON written with --json, or a watch dump folder / manifest.json / dump_dir")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML (one case per check and error finding)")
    p.add_argument("--json", metavar="PATH", help="write the (merged) result as JSON, with its sidecar")
    p.add_argument("--github", action="store_true",
                   help="append a Markdown summary to $GITHUB_STEP_SUMMARY and print ::error annotations")
    quiet_option(p)
    p.set_defaults(command_module=__name__)


def run(args: argparse.Namespace, console: Any) -> int:
    from nanscope.cli._common import check_paths
    from nanscope.report.merge import load_report
    from nanscope.report.outputs import write_outputs
    from nanscope.report.terminal import render

    check_paths(args)
    result = load_report(args.results)
    render(result, console)
    write_outputs(result, args, console)
    return result.exit_code
