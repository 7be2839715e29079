"""What the subcommands share: the replay and output options, output-path guards, the console, dump paths."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence


def replay_arguments(p: argparse.ArgumentParser) -> None:
    """CHECKPOINT [BATCH] and the model options, shared by every command that replays a batch."""
    p.add_argument("checkpoint", help="checkpoint file, a transformers save_pretrained folder, or a nanscope.watch "
                                      "dump folder")
    p.add_argument("batch", nargs="?", help="batch file (torch.save of the schema in README); omit for a dump")
    model_options(p)


def model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="groundingdino config (.py as shipped, or .json; default: SwinT-OGC), or a "
                                    "transformers config.json for a state-dict file")
    p.add_argument("--text-encoder", help="Hugging Face name or local folder of the BERT / tokenizer; default: from "
                                          "the config (transformers: the folder's tokenizer)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--stack", metavar="NAME",
                   help="the model family (groundingdino-py, transformers or hf); default: detected from the checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need pickled Python objects (can run code: only for files you trust)")


def output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write the result as JSON (schema in README)")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML (one case per check and error finding)")
    p.add_argument("--github", action="store_true",
                   help="append a Markdown summary to $GITHUB_STEP_SUMMARY and print ::error annotations")


def quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (the live status on a terminal, the per-stage lines off it)")


def codes(value: str | None) -> list[str] | None:
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


def console() -> Any:
    from rich.console import Console

    return Console(width=80 if not sys.stdout.isatty() else None, highlight=False)


AUTOCAST_TO_AMP = {"float16": "fp16", "bfloat16": "bf16"}  # manifest autocast dtype -> --amp


def dump_paths(args: argparse.Namespace) -> None:
    """`inspect DUMP` (a nanscope.watch dump, or the dump_dir holding several) -> its checkpoint, batch,
    config, text encoder and autocast dtype. In a dump_dir, the origin rank's first bad step is replayed."""
    import json

    from nanscope.errors import InputError

    d = Path(args.checkpoint)
    if not d.is_dir():
        return
    is_dump = (d / "manifest.json").is_file() or (d / "checkpoint.pth").is_file() or any(d.glob("step*-rank*/manifest.json"))
    if not is_dump and (d / "config.json").is_file():
        return  # a transformers save_pretrained folder: the model itself, read by its stack
    if args.batch:
        raise InputError(f"{str(d)!r} is a folder (a dump); pass it alone, without a batch file")
    if not (d / "checkpoint.pth").is_file() and any(d.glob("step*-rank*/manifest.json")):
        from nanscope.watch.ranks import merge_rank_dumps

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
        stack = meta.get("stack") if isinstance(meta.get("stack"), dict) else {}
        if getattr(args, "stack", None) is None and isinstance(stack.get("stack"), str):
            args.stack = stack["stack"]
        model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
        if getattr(args, "train_mode", False) is None:  # inspect: replay in the mode the step ran in
            args.train_mode = bool(model.get("training"))
        if getattr(args, "rng", False) is None and (d / "rng.pt").is_file():
            args.rng = str(d / "rng.pt")
        autocast = (meta.get("amp") or {}).get("autocast") or {}
        if getattr(args, "amp", None) is None and autocast:
            args.amp = AUTOCAST_TO_AMP.get(next(iter(autocast.values())))
