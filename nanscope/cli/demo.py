"""`nanscope demo`: write a small real GroundingDINO and a batch that NaNs, then inspect and verify-fix it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nanscope.cli._common import check_output_path, quiet_option

EXIT_OK = 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="build a small real GroundingDINO and a batch that NaNs, then inspect it")
    p.add_argument("--out", default="reports/demo", help="folder for the demo files (default: reports/demo)")
    p.add_argument("--html", metavar="PATH", help="HTML report path (default: OUT/report.html)")
    p.add_argument("--no-html", action="store_true", help="skip the HTML report")
    p.add_argument("--no-verify", action="store_true", help="skip verify-fix")
    quiet_option(p)
    p.add_argument("--stack", default=None, choices=["groundingdino-py", "transformers", "hf", "hf-mm"],
                   help="the model family of the demo model (default: groundingdino-py when a `groundingdino` "
                        "module is installed, else hf: transformers' GroundingDinoForObjectDetection saved with "
                        "save_pretrained; hf-mm: its MMGroundingDinoForObjectDetection, MM-GroundingDINO / LLMDet, "
                        "verified with the mmdet preset)")
    p.set_defaults(command_module=__name__)


MARKER = ".nanscope-demo.json"  # what the demo wrote into --out: {relative path: sha256}
DEMO_CRITERION = "nanscope.criterion:NaiveCriterion"  # the unmasked loss that reproduces the NaN
DEMO_VERIFY_STEPS = 3  # enough to see the loss go down; the default 5 would double the demo's run time


def run(args: argparse.Namespace, console: Any) -> int:
    out = Path(args.out)
    html = None if args.no_html else (args.html or str(out / "report.html"))
    check_demo_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from nanscope.errors import OutputError

        raise OutputError(f"demo folder {str(out)!r} cannot be created: {exc.strerror or exc}") from None
    check_output_path(html, [])
    try:
        return _demo(args, console, out, html)
    finally:
        _write_marker(out)  # also after an error: what the demo wrote so far may be overwritten next time


def _files(out: Path) -> dict[str, str]:
    """{path relative to `out`: sha256} of every file under `out`, the marker left out."""
    import hashlib

    found = {}
    for f in sorted(out.rglob("*")):
        if (f.is_file() or f.is_symlink()) and f.name != MARKER:
            found[f.relative_to(out).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "link"
    return found


def check_demo_folder(out: Path) -> None:
    """Refuse (exit 2) an --out folder holding files the demo did not write, or files changed since it
    wrote them: the demo writes config.json and checkpoint.pth, names a user's folder may already hold."""
    import json

    from nanscope.errors import OutputError

    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"demo --out {str(out)!r} is a file; expected a new or empty folder")
    present = _files(out)
    if not present:
        return
    try:
        written = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        written = {}
    foreign = sorted(k for k, v in present.items() if not isinstance(written, dict) or written.get(k) != v)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"demo folder {str(out)!r} holds {len(foreign)} file(s) nanscope's demo did not write "
                          f"(or that changed since): {shown}; the demo would overwrite them. Pass --out with a new or "
                          "empty folder")


def _write_marker(out: Path) -> None:
    import json

    from nanscope.safe_io import write_atomic

    if out.is_dir():
        write_atomic(out / MARKER, json.dumps(_files(out), indent=1, sort_keys=True) + "\n")


def shell_words(*words: Any) -> str:
    """Paths and options as one shell line that pastes (quoted where a path needs it)."""
    import shlex

    return " ".join(shlex.quote(str(w)) for w in words)


def show_command(console: Any, command: str) -> None:
    """`$ COMMAND` on one line, never wrapped at the console's width: a pasted wrapped line loses arguments."""
    console.print(f"$ {command}", soft_wrap=True, markup=False, highlight=False)


def demo_stack(asked: str | None) -> str:
    """The stack the demo runs: the one asked for, else groundingdino-py when a provider is installed."""
    if asked is not None:
        return {"hf": "transformers"}.get(asked, asked)
    from nanscope.stacks.groundingdino.provider import find_provider

    return "groundingdino-py" if find_provider() is not None else "transformers"


def _demo(args: argparse.Namespace, console: Any, out: Path, html: str | None) -> int:
    from nanscope.replay.diagnose import inspect_replay
    from nanscope.replay.session import prepare
    from nanscope.report.outputs import write_outputs
    from nanscope.report.terminal import render
    from nanscope.stacks.groundingdino.demo import write_demo

    stack = demo_stack(args.stack)
    if args.stack is None and stack == "transformers":
        console.print("no `groundingdino` module is installed (nanscope's core install), so this is the "
                      "transformers demo (--stack hf); `pip install 'nanscope[groundingdino]'` (or any other "
                      "groundingdino provider) for the groundingdino-py one", markup=False)
    console.print(f"writing the demo model, checkpoint and batch to {out}/ ...")
    if stack == "groundingdino-py":
        files = write_demo(out)
        replay = prepare(files.checkpoint, files.batch, config=files.config)  # built once, shared by both steps
        model_args = shell_words(files.checkpoint, files.batch, "--config", files.config)
    else:
        from nanscope.stacks.transformers.demo import write_hf_demo

        hf_files = write_hf_demo(out, mm=args.stack == "hf-mm")
        replay = prepare(hf_files.model, hf_files.batch)
        model_args = shell_words(hf_files.model, hf_files.batch)
    show_command(console, f"nanscope inspect {model_args} --criterion {DEMO_CRITERION}")
    result = inspect_replay(replay, criterion=DEMO_CRITERION)
    render(result, console)
    if html:
        write_outputs(result, argparse.Namespace(html=html), console)
        console.print(f"HTML report: {html}")
    if args.no_verify:
        return EXIT_OK
    from nanscope.verify.pipeline import verify_replay

    show_command(console, f"nanscope verify-fix {model_args} --steps {DEMO_VERIFY_STEPS}")
    verified = verify_replay(replay, steps=DEMO_VERIFY_STEPS)
    render(verified, console)
    if html:
        vhtml = str(Path(html).with_name("verify-fix.html"))
        write_outputs(verified, argparse.Namespace(html=vhtml), console)
        console.print(f"HTML report: {vhtml}")
    return verified.exit_code
