"""Write a Result to the files the user asked for (--json, --html, --junit, --github)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nanscope.errors import OutputError


def write_text(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"output {path!r} cannot be written: {exc.strerror or exc}") from None


def write_outputs(result: Any, args: argparse.Namespace, console: Any) -> None:
    if getattr(args, "json", None):
        write_text(args.json, result.to_json())
    if getattr(args, "html", None):
        from nanscope.report.html import render_html

        write_text(args.html, render_html(result))
    if getattr(args, "junit", None):
        from nanscope.report.ci import junit_xml

        write_text(args.junit, junit_xml(result))
    if getattr(args, "github", False):
        from nanscope.report.ci import github_outputs

        github_outputs(result, console)
