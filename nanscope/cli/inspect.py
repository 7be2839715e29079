"""`nanscope inspect CHECKPOINT BATCH` (or a watch dump): replay, capture, diagnose."""

from __future__ import annotations

import argparse
from typing import Any

from nanscope.cli._common import check_paths, codes, dump_paths, output_options, quiet_option, replay_arguments


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help="replay one batch through a GroundingDINO checkpoint and diagnose it")
    replay_arguments(p)
    p.add_argument("--criterion", metavar="MODULE:ATTR",
                   help="your criterion, run on the captured outputs (class, factory or function); "
                        "'transformers' on the transformers stack runs its own loss")
    p.add_argument("--trace", action="store_true",
                   help="trace the first non-finite operation, forward and backward (slower)")
    p.add_argument("--amp", choices=["fp16", "bf16"], help="replay the forward under autocast, as AMP training does")
    p.add_argument("--train-mode", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the forward in training mode (dropout, drop-path), with the generator states of "
                        "--rng set at its start; no optimizer step, no state kept (default: on for a dump of a "
                        "step that ran in training mode, else off)")
    p.add_argument("--rng", metavar="PATH",
                   help="a nanscope.watch dump's rng.pt, restored before a --train-mode forward (default with a dump)")
    p.add_argument("--select", metavar="CODES", help="only these finding codes (comma separated)")
    p.add_argument("--ignore", metavar="CODES", help="skip these finding codes (comma separated)")
    output_options(p)
    quiet_option(p)
    p.set_defaults(command_module=__name__)


def run(args: argparse.Namespace, console: Any) -> int:
    from nanscope.errors import InputError
    from nanscope.replay.diagnose import inspect
    from nanscope.report.outputs import write_outputs
    from nanscope.report.terminal import render

    dump_paths(args)
    if not args.batch:
        from pathlib import Path

        from nanscope.stacks.formats.peft import adapter_alone_message

        raise InputError(adapter_alone_message(Path(args.checkpoint))
                         or "inspect needs CHECKPOINT BATCH (or a dump folder)")
    check_paths(args)
    result = inspect(args.checkpoint, args.batch, config=args.config, text_encoder=args.text_encoder,
                     device=args.device, criterion=args.criterion, trust_checkpoint=args.trust_checkpoint,
                     select=codes(args.select), ignore=codes(args.ignore), trace=args.trace, amp=args.amp,
                     stack=args.stack, adapter=args.adapter, merge_lora=args.merge_lora,
                     train_mode=bool(args.train_mode), rng=args.rng if args.train_mode else None)
    render(result, console)
    write_outputs(result, args, console)
    return result.exit_code
