"""The command line: the only place that prints and chooses exit codes.

Exit codes: 0 clean (or every verify-fix check passes), 1 an error finding (or a failed check),
2 bad input or usage (one-paragraph message, no traceback), 3 an internal error in nanscope.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_FINDINGS, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def replay_arguments(p: argparse.ArgumentParser) -> None:
    """CHECKPOINT [BATCH] and the model options, shared by every command that replays a batch."""
    p.add_argument("checkpoint", help="checkpoint file, or a nanscope.watch dump folder")
    p.add_argument("batch", nargs="?", help="batch file (torch.save of the schema in README); omit for a dump")
    _model_options(p)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="groundingdino config (.py as shipped, or .json); default: SwinT-OGC")
    p.add_argument("--text-encoder", help="Hugging Face name or local folder of the BERT; default: from the config")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need pickled Python objects (can run code: only for files you trust)")


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write the result as JSON (schema in README)")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML (one case per check and error finding)")
    p.add_argument("--github", action="store_true",
                   help="append a Markdown summary to $GITHUB_STEP_SUMMARY and print ::error annotations")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanscope",
        description="Find out why a GroundingDINO loss went NaN, apply the fix, and prove it worked.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="build a small real GroundingDINO and a batch that NaNs, then inspect it")
    p.add_argument("--out", default="reports/demo", help="folder for the demo files (default: reports/demo)")
    p.add_argument("--html", metavar="PATH", help="HTML report path (default: OUT/report.html)")
    p.add_argument("--no-html", action="store_true", help="skip the HTML report")
    p.add_argument("--no-verify", action="store_true", help="skip verify-fix")

    p = sub.add_parser("inspect", help="replay one batch through a GroundingDINO checkpoint and diagnose it")
    replay_arguments(p)
    p.add_argument("--criterion", metavar="MODULE:ATTR",
                   help="your criterion, run on the captured outputs (class, factory or function)")
    p.add_argument("--trace", action="store_true",
                   help="trace the first non-finite operation, forward and backward (slower)")
    p.add_argument("--amp", choices=["fp16", "bf16"], help="replay the forward under autocast, as AMP training does")
    p.add_argument("--select", metavar="CODES", help="only these finding codes (comma separated)")
    p.add_argument("--ignore", metavar="CODES", help="skip these finding codes (comma separated)")
    _output_options(p)

    p = sub.add_parser("codes", help="list the finding codes")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _codes(value: str | None) -> list[str] | None:
    return [c for c in value.split(",") if c.strip()] if value else None


def check_output_path(path: str | None, inputs: Sequence[str | None]) -> None:
    """Fail early (exit 2) when an output cannot be written or would overwrite an input."""
    from nanscope.errors import OutputError

    if not path:
        return
    p = Path(path)
    for i in inputs:
        if i and Path(i).exists() and p.exists() and p.resolve() == Path(i).resolve():
            raise OutputError(f"output {path!r} is one of the input files; nanscope never overwrites its inputs")
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OutputError(f"output {path!r} is a folder; expected a file path")
    if not parent.is_dir():
        raise OutputError(f"output {path!r} cannot be written: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputError(f"output {path!r} cannot be written: permission denied")


def _console() -> Any:
    from rich.console import Console

    return Console(width=80 if not sys.stdout.isatty() else None, highlight=False)


AUTOCAST_TO_AMP = {"float16": "fp16", "bfloat16": "bf16"}  # manifest autocast dtype -> --amp


def _dump_paths(args: argparse.Namespace) -> None:
    """`inspect DUMP` (a nanscope.watch dump, or the dump_dir holding several) -> its checkpoint, batch,
    config, text encoder and autocast dtype. In a dump_dir, the origin rank's first bad step is replayed."""
    import json

    from nanscope.errors import InputError

    d = Path(args.checkpoint)
    if not d.is_dir():
        return
    if args.batch:
        raise InputError(f"{str(d)!r} is a folder (a dump); pass it alone, without a batch file")
    if not (d / "checkpoint.pth").is_file() and any(d.glob("step*-rank*/manifest.json")):
        from nanscope.ranks import merge_rank_dumps

        merged = merge_rank_dumps(d)
        if not merged.get("replay"):
            raise InputError(f"no dump in {str(d)!r} holds a checkpoint of the origin rank; "
                             f"replay one of its step*-rank* folders")
        d = Path(merged["replay"])
    ck, bt = d / "checkpoint.pth", d / "batch.pt"
    if not ck.is_file() or not bt.is_file():
        raise InputError(f"folder {str(d)!r} is not a nanscope dump: expected checkpoint.pth and batch.pt in it")
    args.checkpoint, args.batch = str(ck), str(bt)
    manifest = d / "manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        if args.config is None and meta.get("config"):
            args.config = meta["config"]
        if args.text_encoder is None and meta.get("text_encoder"):
            args.text_encoder = meta["text_encoder"]
        autocast = (meta.get("amp") or {}).get("autocast") or {}
        if getattr(args, "amp", None) is None and autocast:
            args.amp = AUTOCAST_TO_AMP.get(next(iter(autocast.values())))


def cmd_inspect(args: argparse.Namespace, console: Any) -> int:
    from nanscope.diagnose import inspect
    from nanscope.errors import InputError
    from nanscope.report.outputs import write_outputs
    from nanscope.report.terminal import render

    _dump_paths(args)
    if not args.batch:
        raise InputError("inspect needs CHECKPOINT BATCH (or a dump folder)")
    for out in (args.json, args.html, args.junit):
        check_output_path(out, [args.checkpoint, args.batch])
    result = inspect(args.checkpoint, args.batch, config=args.config, text_encoder=args.text_encoder,
                     device=args.device, criterion=args.criterion, trust_checkpoint=args.trust_checkpoint,
                     select=_codes(args.select), ignore=_codes(args.ignore), trace=args.trace, amp=args.amp)
    render(result, console)
    write_outputs(result, args, console)
    return result.exit_code


DEMO_CRITERION = "nanscope.criterion:NaiveCriterion"  # the unmasked loss that reproduces the NaN
DEMO_VERIFY_STEPS = 3  # enough to see the loss go down; the default 5 would double the demo's run time


def cmd_demo(args: argparse.Namespace, console: Any) -> int:
    from nanscope.diagnose import inspect_replay
    from nanscope.models.demo import write_demo
    from nanscope.replay import prepare
    from nanscope.report.outputs import write_outputs
    from nanscope.report.terminal import render

    out = Path(args.out)
    html = None if args.no_html else (args.html or str(out / "report.html"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from nanscope.errors import OutputError

        raise OutputError(f"demo folder {str(out)!r} cannot be created: {exc.strerror or exc}") from None
    check_output_path(html, [])
    console.print(f"writing the demo model, checkpoint and batch to {out}/ ...")
    files = write_demo(out)
    replay = prepare(files.checkpoint, files.batch, config=files.config)  # built once, shared by both steps
    console.print(f"$ nanscope inspect {files.checkpoint} {files.batch} --config {files.config} "
                  f"--criterion {DEMO_CRITERION}")
    result = inspect_replay(replay, criterion=DEMO_CRITERION)
    render(result, console)
    if html:
        write_outputs(result, argparse.Namespace(html=html), console)
        console.print(f"HTML report: {html}")
    if args.no_verify:
        return EXIT_OK
    from nanscope.verify import verify_replay

    console.print(f"$ nanscope verify-fix {files.checkpoint} {files.batch} --config {files.config} "
                  f"--steps {DEMO_VERIFY_STEPS}")
    verified = verify_replay(replay, steps=DEMO_VERIFY_STEPS)
    render(verified, console)
    if html:
        vhtml = str(Path(html).with_name("verify-fix.html"))
        write_outputs(verified, argparse.Namespace(html=vhtml), console)
        console.print(f"HTML report: {vhtml}")
    return verified.exit_code


def cmd_codes(args: argparse.Namespace, console: Any) -> int:
    from nanscope.findings import CATALOGUE

    for c in CATALOGUE.values():
        console.print(f"{c.code}  {c.severity.value:<7}  {c.title}", highlight=False)
    return EXIT_OK


COMMANDS = {"demo": cmd_demo, "inspect": cmd_inspect, "codes": cmd_codes}

# Subcommands in their own modules (nanscope/commands/): register(subparsers) adds the parser with
# `set_defaults(command_module=<module name>)`, run(args, console) returns the exit code.
COMMAND_MODULES: list[str] = ["nanscope.commands.report", "nanscope.commands.verify_fix"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")  # third-party deprecation noise would bury the report
    console = _console()
    from nanscope.errors import NanscopeError

    try:
        if getattr(args, "command_module", None):
            return int(importlib.import_module(args.command_module).run(args, console))
        return COMMANDS[args.command](args, console)
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


if __name__ == "__main__":
    sys.exit(main())
