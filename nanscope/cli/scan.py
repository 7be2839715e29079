"""`nanscope scan DATA`: every data bug in a whole dataset, before training, with no model.

Exit 0 clean, 1 when an error-severity data bug exists, 2 for bad input (a malformed line, a bbox of
3 numbers, a missing label map: the message names the file, line and field).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from nanscope.cli._common import check_paths, output_options, quiet_option


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "scan", help="check every sample of a dataset (COCO, ODVG, grounding JSON) for data bugs before training",
        description="Build each sample's caption and positive map as the trainer would and report every data bug "
                    "that breaks or silently corrupts the loss, per sample. No model is built.")
    p.add_argument("data", help="COCO detection JSON, ODVG .jsonl (OD or VG) or COCO-style grounding JSON")
    p.add_argument("--format", choices=["coco", "odvg", "grounding"], help="force the format (default: detected)")
    p.add_argument("--label-map", metavar="FILE", help="ODVG detection: the label map JSON {\"0\": \"person\", ...}")
    p.add_argument("--config", help="groundingdino config: max_text_len and the text encoder (default: SwinT-OGC)")
    p.add_argument("--text-encoder", help="Hugging Face name or local folder of the tokenizer (default: the config's)")
    p.add_argument("--stack", metavar="NAME", help="the model family whose tokenizer and max_text_len to use "
                                                   "(default: groundingdino-py)")
    g = p.add_argument_group("caption rules (as the trainer builds captions; see docs/scan.md)")
    g.add_argument("--trainer", choices=["open-groundingdino", "mmdet"], default="open-groundingdino",
                   help="whose caption rules to reproduce (default: open-groundingdino)")
    g.add_argument("--max-labels", type=int, metavar="N",
                   help="OD: category names per caption, positives included (Open-GroundingDino max_labels; "
                        "default 50 as its cfg_odvg.py; mmdet: no cap)")
    g.add_argument("--negatives", type=int, metavar="N",
                   help="OD: at most N negative names (default: fill up to --max-labels; mmdet: 85)")
    g.add_argument("--order", choices=["shuffle", "label-map"], help="OD/VG name order (default: shuffle)")
    g.add_argument("--seed", type=int, help="seed of the scan's draw of negatives and orders (default 0)")
    g.add_argument("--vg-caption", choices=["rebuild", "file"],
                   help="ODVG VG: rebuild the caption from the phrases (open-groundingdino) or keep the file's (mmdet)")
    g.add_argument("--match", choices=["find", "span"],
                   help="box tokens from caption.find(phrase) (open-groundingdino) or the character spans (mmdet)")
    p.add_argument("--images", metavar="DIR", help="image folder: check that files exist and sizes match")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default 1)")
    p.add_argument("--shard", metavar="I/N", help="scan shard I of N (samples with index %% N == I); merge with "
                                                   "`nanscope report shard*.json`")
    p.add_argument("--write-clean", metavar="OUT", help="write a copy without the broken boxes/samples (never in "
                                                       "place); OUT.changes.json lists every change")
    p.add_argument("--batch-out", metavar="PATH", help="write the samples --ids as a nanscope batch file (needs --images)")
    p.add_argument("--ids", metavar="IDS", help="sample ids for --batch-out, e.g. 17,42")
    p.add_argument("--image-size", type=int, default=800, metavar="PX",
                   help="--batch-out: resize the shorter side to PX as groundingdino's transforms do (default 800)")
    quiet_option(p)
    output_options(p)
    p.set_defaults(command_module=__name__)


def run(args: argparse.Namespace, console: Any) -> int:
    from nanscope.errors import InputError
    from nanscope.report.outputs import write_outputs
    from nanscope.report.terminal import render
    from nanscope.scan.captions import CaptionRules
    from nanscope.scan.run import scan

    check_paths(args)
    if args.batch_out and not (args.ids and args.images):
        raise InputError("--batch-out needs --ids (the samples to write) and --images (the folder of their images)")
    if args.write_clean and args.shard:
        raise InputError("--write-clean writes a copy of the whole dataset; run it without --shard")
    if args.ids and not args.batch_out:
        raise InputError("--ids selects samples for --batch-out; pass --batch-out PATH too")
    ids = None
    if args.batch_out:
        from nanscope.scan.batch_out import parse_ids

        ids = parse_ids(args.ids)
    rules = CaptionRules.preset(args.trainer, max_labels=args.max_labels, negatives=args.negatives, order=args.order,
                                seed=args.seed, vg_caption=args.vg_caption, match=args.match)
    if args.workers == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # one process: the tokenizer's own threads do the work
    writer = None
    try:
        if args.write_clean:
            from nanscope.scan.clean import CleanWriter
            from nanscope.scan.run import prepare_scan

            prep = prepare_scan(args.data, format=args.format, label_map=args.label_map, config=args.config,
                                text_encoder=args.text_encoder, rules=rules, images=args.images, keep=ids or (),
                                stack=args.stack)
            writer = CleanWriter(prep.dataset, prep.state, args.write_clean)
            run_ = scan(args.data, prepared=prep, workers=args.workers, shard=args.shard, on_chunk=writer.on_chunk)
        else:
            run_ = scan(args.data, format=args.format, label_map=args.label_map, config=args.config,
                        text_encoder=args.text_encoder, rules=rules, images=args.images, workers=args.workers,
                        shard=args.shard, keep=ids or (), stack=args.stack)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    result = run_.result
    render(result, console)
    write_outputs(result, args, console)
    if writer is not None:
        changes = writer.finish()
        console.out(f"wrote {args.write_clean} ({len(changes)} change(s), listed in "
                    f"{args.write_clean}.changes.json)", highlight=False)
    if args.batch_out:
        from nanscope.scan.batch_out import write_batch

        write_batch(args.batch_out, run_.kept, ids or [], args.images, image_size=args.image_size)
        console.out(f"wrote {args.batch_out} ({len(ids or [])} sample(s)); replay it with "
                    f"`nanscope inspect CHECKPOINT {args.batch_out}`", highlight=False)
    return result.exit_code
