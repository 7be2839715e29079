"""Write a Result to the files the user asked for (--json, --html, --junit, --github)."""

from __future__ import annotations

import argparse
from typing import Any


def write_text(path: str, text: str) -> None:
    """Through a temporary file and a rename: the path holds the old file or the whole new one."""
    from nanscope.safe_io import write_atomic

    write_atomic(path, text)


def write_outputs(result: Any, args: argparse.Namespace, console: Any) -> None:
    """--json PATH also writes PATH.artifacts.pt (the figures' tensors) so `nanscope report` can re-render."""
    if getattr(args, "json", None):
        from nanscope.report.json_io import write_result

        write_result(result, args.json)
    if getattr(args, "html", None):
        from nanscope.report.html import render_html

        write_text(args.html, render_html(result))
    if getattr(args, "junit", None):
        from nanscope.report.ci import junit_xml

        write_text(args.junit, junit_xml(result))
    if getattr(args, "github", False):
        from nanscope.report.ci import github_outputs

        github_outputs(result, console)
