"""`nanscope verify-fix CHECKPOINT BATCH`: run the before and after criteria on one replayed batch, ten checks."""

from __future__ import annotations

import argparse
from typing import Any

PRESET_NAMES = ("mmdet", "open-groundingdino", "hf")  # nanscope.criterion.presets.PRESETS, listed here to keep --help fast


def register(subparsers: Any) -> None:
    from nanscope.cli._common import output_options, quiet_option, replay_arguments

    p = subparsers.add_parser(
        "verify-fix", help="prove a fixed criterion removes the NaN and nothing else (ten checks)",
        description="Replay one batch, compute the before and after criteria on the same outputs, backpropagate "
                    "each, and run ten checks: (1) before reproduces the bug (a non-finite term, or a loss that "
                    "raises on the batch); (2) every after term is finite and none is 0 while boxes exist; (3) "
                    "after's gradients are finite for every layer's logits and boxes and every parameter; (4) after "
                    "equals nanscope's masked_select reference for the preset; (5) after equals before on valid "
                    "text positions; (6) on a batch without padding after equals before (the fix is a no-op where "
                    "nothing is wrong); (7) before's and after's matchers assign the same pairs; (8) a few training "
                    "steps with after stay finite and lower the loss; (9) after's peak memory is within 1.5x of "
                    "before's; (10) after supervises what it should (no NS401/NS402/NS403). FIXED needs checks 1, 2, "
                    "3, 8, 9 and 10; 4-7 say whether after also equals the reference and before.")
    replay_arguments(p)
    p.add_argument("--before", metavar="MODULE:ATTR",
                   help="the criterion that NaNs (class, factory or function), or 'transformers' on that stack; "
                        "default: nanscope's naive criterion")
    p.add_argument("--after", metavar="MODULE:ATTR",
                   help="the fixed criterion, or 'transformers' on that stack; default: nanscope.criterion.SetCriterion "
                        "for --preset")
    p.add_argument("--preset", default=None, choices=PRESET_NAMES,
                   help="loss weights, normalizers and matching of the reference trainer (default: the stack's: "
                        "mmdet for groundingdino-py, hf for transformers)")
    p.add_argument("--steps", type=int, default=5, metavar="N",
                   help="AdamW steps (lr 1e-4) on a copy of the model with the after criterion (default: 5, min 2)")
    output_options(p)
    quiet_option(p)
    p.set_defaults(command_module=__name__)


def run(args: argparse.Namespace, console: Any) -> int:
    from nanscope.cli._common import check_paths, dump_paths
    from nanscope.errors import InputError
    from nanscope.report.outputs import write_outputs
    from nanscope.report.terminal import render
    from nanscope.verify.pipeline import verify_fix

    dump_paths(args)
    if not args.batch:
        raise InputError("verify-fix needs CHECKPOINT BATCH (or a dump folder)")
    if args.steps < 2:
        raise InputError(f"--steps {args.steps} given; at least 2 are needed to compare the first and last loss")
    check_paths(args)
    result = verify_fix(args.checkpoint, args.batch, before=args.before, after=args.after, preset=args.preset,
                        steps=args.steps, config=args.config, text_encoder=args.text_encoder, device=args.device,
                        trust_checkpoint=args.trust_checkpoint, stack=args.stack, adapter=args.adapter,
                        merge_lora=args.merge_lora)
    render(result, console)
    write_outputs(result, args, console)
    return result.exit_code
