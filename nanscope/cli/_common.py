"""What the subcommands share: the replay and output options, output-path guards, the console, dump paths."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def replay_arguments(p: argparse.ArgumentParser) -> None:
    """CHECKPOINT [BATCH] and the model options, shared by every command that replays a batch."""
    p.add_argument("checkpoint", help="checkpoint file, a transformers save_pretrained folder, or a nanscope.watch "
                                      "dump folder")
    p.add_argument("batch", nargs="?",
                   help="batch file (torch.save of the schema in docs/batch-format.md); omit for a dump")
    model_options(p)
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run your criterion/matcher once in a child process first, so os._exit or a crash in it "
                        "cannot end nanscope or choose its exit code (default: on; costs one more criterion call)")
    p.add_argument("--trust-config", action="store_true",
                   help="run the .py config an older watch dump names (it runs Python code: only for files you "
                        "trust); a dump's recorded config values and your own --config need no flag")
    # PEFT (LoRA): owned by nanscope.stacks.formats.peft
    p.add_argument("--adapter", metavar="PATH",
                   help="a PEFT adapter folder (save_pretrained) or a file of LoRA/trainable weights, applied on top "
                        "of CHECKPOINT (the base model); an adapter folder or LoRA keys in CHECKPOINT are found alone")
    p.add_argument("--merge-lora", action="store_true",
                   help="merge the LoRA weights into the model before the replay (default: unmerged, through PEFT's "
                        "layers, as training ran)")


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
    p.add_argument("--json", metavar="PATH", help="write the result as JSON (schema in docs/reports.md)")
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
    """Fail early (exit 2) when an output cannot be written or would overwrite an input (by identity)."""
    from nanscope.safe_io import guard_outputs

    if not path:
        return
    guard_outputs([("output", path)], inputs)
    _writable(path)


def _writable(path: str) -> None:
    from nanscope.errors import OutputError

    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OutputError(f"output {path!r} is a folder; expected a file path")
    if p.exists() and not p.is_file():
        raise OutputError(f"output {path!r} is not a regular file (a device, a pipe or a socket); expected a file path")
    if not parent.is_dir():
        raise OutputError(f"output {path!r} cannot be written: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputError(f"output {path!r} cannot be written: permission denied")


INPUT_OPTIONS = ("checkpoint", "batch", "config", "text_encoder", "dump", "data", "label_map", "images")
TEXT_ENCODER_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "vocab.txt")
CODE_OPTIONS = ("criterion", "before", "after")  # MODULE:ATTR; the module's file is an input too


def criterion_file(spec: str | None) -> str | None:
    """The .py file a `MODULE:ATTR` spec names, found without importing anything (None when not found)."""
    if not spec:
        return None
    module = spec.split(":", 1)[0] if ":" in spec else spec
    if module.endswith(".py") or "/" in module or "\\" in module:
        return module
    parts = module.split(".")
    for root in [os.getcwd(), *sys.path]:
        base = Path(root or ".", *parts)
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                return str(cand)
    return None


def output_paths(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """Every file a command may write, as (option, path): --json with its sidecar, --html, --junit,
    scan's --write-clean (with OUT.changes.json) and --batch-out."""
    from nanscope.report.json_io import sidecar_path

    out: list[tuple[str, str | None]] = []
    for name in ("json", "html", "junit", "write_clean", "batch_out"):
        path = getattr(args, name, None)
        if not path:
            continue
        out.append((f"--{name.replace('_', '-')}", path))
        if name == "json":
            out.append(("the --json sidecar", str(sidecar_path(path))))
        if name == "write_clean":
            out.append(("the --write-clean change list", f"{path}.changes.json"))
    return out


def input_paths(args: argparse.Namespace) -> list[str]:
    """Every input file or folder named on the command line (report's RESULTs with their sidecars)."""
    from nanscope.report.json_io import sidecar_path

    paths = [str(_path_option(args, n)) for n in INPUT_OPTIONS if _path_option(args, n)]
    te = _config_text_encoder(_path_option(args, "config"))
    if te:
        paths.append(te)
    paths += [f for f in (criterion_file(getattr(args, n, None)) for n in CODE_OPTIONS) if f]
    for r in getattr(args, "results", None) or []:
        paths += [r, str(sidecar_path(r))]
    return paths


def _path_option(args: argparse.Namespace, name: str) -> str | None:
    """The path an input option names; None for an unset one and for values that are not paths (a dump's
    recorded config values replace --config after `dump_paths`)."""
    value = getattr(args, name, None)
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) and os.fspath(value) else None


def _config_text_encoder(config: str | None) -> str | None:
    """The local text encoder folder a .json groundingdino config names (relative to the config), if any."""
    import json

    if not config or not config.endswith(".json") or not Path(config).is_file():
        return None
    try:
        te = json.loads(Path(config).read_text(encoding="utf-8")).get("text_encoder_type")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(te, str) or not te:
        return None
    for cand in (Path(config).parent / te, Path(te)):
        if cand.is_dir():
            return str(cand)
    return None


def check_paths(args: argparse.Namespace) -> None:
    """Exit 2 before any work when an input is not a file or folder (a device such as /dev/null, a
    pipe), --text-encoder names a folder that holds no model, or an output (sidecars included) is an
    input file, a file inside an input folder (compared by device and inode, so hard links and other
    spellings count), another output, or cannot be written."""
    from nanscope.safe_io import guard_outputs

    _check_inputs(args)
    outputs = output_paths(args)
    guard_outputs(outputs, input_paths(args))
    for _, path in outputs:
        if path:
            _writable(path)


def _check_inputs(args: argparse.Namespace) -> None:
    from nanscope.errors import InputError

    named = [(n, _path_option(args, n)) for n in INPUT_OPTIONS] + [("RESULT", r) for r in getattr(args, "results", [])]
    for name, raw in named:
        if not raw:
            continue
        p = Path(raw)
        if p.exists() and not (p.is_file() or p.is_dir()):
            raise InputError(f"{name.replace('_', '-')} {str(p)!r} is not a regular file or folder (a device, pipe "
                             "or socket); expected the file itself")
    te = getattr(args, "text_encoder", None)
    if te and Path(te).exists():
        p = Path(te)
        if not p.is_dir() or not any((p / f).is_file() for f in TEXT_ENCODER_FILES):
            what = "a file" if not p.is_dir() else f"a folder without any of {', '.join(TEXT_ENCODER_FILES)}"
            raise InputError(f"--text-encoder {te!r} is {what}; expected a Hugging Face BERT / tokenizer folder "
                             "(as save_pretrained writes it) or a model name")


def console() -> Any:
    from rich.console import Console

    return Console(width=80 if not sys.stdout.isatty() else None, highlight=False)


AUTOCAST_TO_AMP = {"float16": "fp16", "bfloat16": "bf16"}  # manifest autocast dtype -> --amp


def dump_paths(args: argparse.Namespace) -> None:
    """`inspect DUMP` (a nanscope.watch dump, or the dump_dir holding several) -> its checkpoint, batch,
    config, text encoder and autocast dtype. In a dump_dir, the origin rank's first bad step is replayed."""
    from nanscope.errors import InputError

    d = Path(args.checkpoint)
    if not d.is_dir():
        return
    is_dump = (d / "manifest.json").is_file() or (d / "checkpoint.pth").is_file() or any(d.glob("step*-rank*/manifest.json"))
    if not is_dump and ((d / "config.json").is_file() or (d / "adapter_config.json").is_file()):
        return  # a transformers save_pretrained folder or a PEFT adapter folder: read by its stack
    if args.batch:
        raise InputError(f"{str(d)!r} is a folder (a dump); pass it alone, without a batch file")
    args.dump = str(d)  # the dump folder (or dump_dir) stays an input: outputs may not replace its files
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
        from nanscope.watch.ranks import validate_manifest
        from nanscope.watch.snapshot import read_manifest

        meta = validate_manifest(read_manifest(d), repr(str(manifest)))
        if args.config is None:  # the dump's recorded values; a file the dump names is never run
            from nanscope.stacks.formats.safe_config import dump_config

            args.config = dump_config(meta, str(d), trust_py=getattr(args, "trust_config", False))
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
