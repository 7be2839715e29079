"""The command line: the only place that prints and chooses exit codes.

Exit codes: 0 clean (or every verify-fix check passes), 1 an error finding (or a failed check),
2 bad input or usage (one-paragraph message, no traceback), 3 an internal error in nanscope.

Each subcommand is a module of this package with `register(subparsers)` (adds its parser with
`set_defaults(command_module=__name__)`) and `run(args, console) -> exit code`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from typing import Sequence

from nanscope.cli._common import check_output_path, dump_paths, output_options, replay_arguments

EXIT_OK, EXIT_FINDINGS, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

COMMAND_MODULES: list[str] = [
    "nanscope.cli.demo", "nanscope.cli.inspect", "nanscope.cli.verify_fix", "nanscope.cli.report",
    "nanscope.cli.codes", "nanscope.cli.scan",
]

__all__ = ["main", "build_parser", "check_output_path", "dump_paths", "output_options", "replay_arguments",
           "COMMAND_MODULES"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanscope",
        description="Find out why a GroundingDINO loss went NaN, apply the fix, and prove it worked.",
    )
    from nanscope import __version__

    parser.add_argument("--version", action="version", version=f"nanscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _isolation(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    if not getattr(args, "isolate", False):  # commands without user code (scan, report) never import torch for it
        return contextlib.nullcontext()
    from nanscope.user_code import isolated_user_code

    return isolated_user_code()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")  # third-party deprecation noise would bury the report
    from nanscope.cli._common import console as make_console

    console = make_console()
    from nanscope.cli._progress import reporting
    from nanscope.errors import NanscopeError

    try:
        with reporting(console, quiet=getattr(args, "quiet", False)):  # ended before any message below
            with _isolation(args):  # --isolate: user code cannot end nanscope
                return int(importlib.import_module(args.command_module).run(args, console))
    except NanscopeError as exc:
        print(f"nanscope: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("nanscope: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in nanscope: say so in one line, keep the traceback out of the report
        if os.environ.get("NANSCOPE_DEBUG"):
            raise
        print(f"nanscope: internal error: {type(exc).__name__}: {exc} (set NANSCOPE_DEBUG=1 for the traceback; "
              "please report it)", file=sys.stderr)
        return EXIT_INTERNAL
