"""`nanscope codes`: the finding codes, their severity and title."""

from __future__ import annotations

import argparse
from typing import Any

EXIT_OK = 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("codes", help="list the finding codes")
    p.set_defaults(command_module=__name__)


def run(args: argparse.Namespace, console: Any) -> int:
    from nanscope.findings import CATALOGUE

    for c in CATALOGUE.values():
        # one line per code, whatever the width (a pipe gets 80 columns): `grep NS1` and scripts read it
        console.print(f"{c.code}  {c.severity.value:<7}  {c.title}", highlight=False, soft_wrap=True)
    return EXIT_OK
