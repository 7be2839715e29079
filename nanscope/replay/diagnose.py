"""`nanscope inspect`: replay one batch, capture what the loss sees, run the analyzers, build a Result."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from nanscope import progress
from nanscope.analyzers import AnalysisContext, run_analyzers
from nanscope.errors import CriterionError, InputError
from nanscope.findings import check_codes
from nanscope.replay.batch import Batch
from nanscope.replay.module_stats import module_stats
from nanscope.replay.session import Replay, load_rng, prepare
from nanscope.result import Result, environment
from nanscope.stacks.capture import ForwardRecord
from nanscope.user_code import call_criterion, collect_model_stdout, collect_user_stdout

SANITIZED_LOGIT = -1.0e4  # finite stand-in for -inf padding in the counterfactual run (fits fp16)
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # --amp: replay the forward under autocast
# Criterion errors that are symptoms nanscope diagnoses (NS203), not bugs in the user's code.
MATCHING_FAILURES = ("MatchingError", "invalid numeric entries", "cost matrix is infeasible")
# Criterion errors from class labels that index past a label map (transformers' loss): NS111/NS112 name them.
LABEL_FAILURES = ("TransformersLabelError",)


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """'fp16' | 'bf16' | None -> the autocast dtype (None: no autocast)."""
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise InputError(f"amp {amp!r} is not supported; expected one of {', '.join(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


# Box functions that assert on degenerate boxes (x1 < x0): NaN boxes fail those asserts with an empty message.
BOX_ASSERTS = ("generalized_box_iou",)


def is_matching_failure(exc: CriterionError) -> bool:
    return any(s in str(exc) for s in MATCHING_FAILURES) or box_assertion(exc) is not None


def box_assertion(exc: BaseException) -> str | None:
    """`'generalized_box_iou (box_ops.py:NN)'` when `exc` wraps an AssertionError raised in one of
    `BOX_ASSERTS` (groundingdino's and DETR's GIoU check that x1 >= x0, false for NaN boxes); else None.

    `call_criterion` raises its CriterionError `from None`: the original stays in `__context__`."""
    import traceback

    inner = exc if isinstance(exc, AssertionError) else exc.__context__
    if not isinstance(inner, AssertionError):
        return None
    for fs in reversed(traceback.extract_tb(inner.__traceback__)):
        if fs.name in BOX_ASSERTS:
            return f"{fs.name} ({os.path.basename(fs.filename)}:{fs.lineno})"
    return None


def is_untruncated_width_failure(exc: CriterionError, texts: list[Any], max_text_len: int) -> bool:
    """A shape error naming max_text_len and the untruncated token count of an over-long caption: the
    criterion built a text mask without truncation (NS406), a symptom nanscope names, not a bug to stop on."""
    import re

    numbers = {int(x) for x in re.findall(r"\d+", str(exc))}
    long = {t.num_tokens for t in texts if t.truncated}
    text = str(exc).lower()
    return ("size" in text or "shape" in text) and max_text_len in numbers and bool(long & numbers)


def is_label_failure(exc: CriterionError) -> bool:
    return any(s in str(exc) for s in LABEL_FAILURES)


def padded_text_mask(mask: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """[B, L] -> [B, width] bool, False past L (ContrastiveEmbed pads with -inf there)."""
    from nanscope.stacks.capture import padded_mask

    return None if mask is None else padded_mask(mask, width)


def sanitize_padding(outputs: dict[str, Any], valid: torch.Tensor) -> dict[str, Any]:
    """Copy of DETR outputs with logits at invalid text columns replaced by a finite value."""
    from nanscope.stacks.capture import map_layers

    def fix(d: dict[str, Any]) -> dict[str, Any]:
        lg = d["pred_logits"]
        return {**d, "pred_logits": torch.where(valid[:, None, :], lg, torch.full_like(lg, SANITIZED_LOGIT))}

    return map_layers(outputs, fix)


SUPERVISION_CODES = ("NS401", "NS402", "NS403", "NS404")  # measured by re-running the user's criterion


def _wants(codes: Iterable[str], select: Iterable[str] | None, ignore: Iterable[str] | None) -> bool:
    chosen = set(select) if select else set(codes)
    return bool(chosen.intersection(codes) - set(ignore or ()))


def nonfinite_images(outputs: dict[str, Any]) -> list[int]:
    """Images whose logits hold NaN/+inf or whose boxes are non-finite (-inf logits are padding, not counted)."""
    lg, bx = outputs["pred_logits"], outputs["pred_boxes"]
    bad = torch.isnan(lg).flatten(1).any(1) | torch.isposinf(lg).flatten(1).any(1) | ~torch.isfinite(bx).flatten(1).all(1)
    return [int(i) for i in bad.nonzero().flatten().tolist()]


def probe_criterion(crit: Any, name: str, outputs: dict[str, Any], targets: list[dict[str, Any]],
                    texts: list[Any], extras: dict[str, Any] | None = None) -> Any:
    """What the user's criterion supervises (nanscope.replay.supervision), measured on the captured outputs.

    extras: the named parameters of the criterion and its matcher (`Replay.criterion_extras`)."""
    from nanscope.replay.supervision import probe_supervision
    from nanscope.user_code import per_image_matcher

    matcher = getattr(crit, "matcher", None)
    return probe_supervision(lambda o, t: call_criterion(crit, o, t, name=name, extras=extras), name, outputs,
                             targets, texts, weight_dict=getattr(crit, "weight_dict", None),
                             matcher=per_image_matcher(matcher, extras) if callable(matcher) else None,
                             nonfinite_images=nonfinite_images(outputs))


def worst_image(ctx: AnalysisContext, layer: str) -> int:
    """The image a person should look at first: most positives on padding, then most -inf cells."""
    assert ctx.logits is not None
    lg = ctx.logits[layer]
    scores = []
    for i, info in enumerate(ctx.texts):
        cut = sum(len(b.cut) for b in info.boxes)
        empty = sum(1 for b in info.boxes if not b.kept)
        scores.append((cut + empty, int(torch.isneginf(lg[i]).sum())))
    return max(range(len(scores)), key=lambda i: scores[i]) if scores else 0


def build_context(replay: Replay, record: ForwardRecord) -> AnalysisContext:
    T = replay.max_text_len
    return AnalysisContext(
        batch=replay.batch, texts=replay.texts, max_text_len=T, record=record, stack=replay.stack,
        logits=record.logits_by_layer(), boxes=record.boxes_by_layer(),
        text_mask=padded_text_mask(record.text_token_mask, T),
        model=replay.model, state_dict=replay.state_dict, key_fit=replay.key_fit,
    )


def _heatmap(ctx: AnalysisContext, layer: str, i: int) -> dict[str, Any]:
    assert ctx.logits is not None
    info = ctx.texts[i]
    return {
        "layer": layer,
        "image": i,
        "logits": ctx.logits[layer][i].detach().float().cpu(),  # [Q, T]
        "text_mask": ctx.text_mask[i].cpu() if ctx.text_mask is not None else None,
        "positive_map": info.positive_map.cpu(),  # [N, T]
        "tokens": list(info.tokens[: ctx.max_text_len]),
        "num_tokens": info.num_tokens,
        "phrases": [b.phrase for b in info.boxes],
    }


def figure_artifacts(ctx: AnalysisContext) -> dict[str, Any]:
    """The small tensors the HTML heatmaps need, on CPU: the worst image (top-level keys and first in
    `heatmaps`) and, when it is another image, the one with the most -inf cells (where padding shows)."""
    if not ctx.logits:
        return {}
    layer = [k for k in ctx.logits if k != "enc"][-1]
    first = worst_image(ctx, layer)
    most_inf = max(range(len(ctx.texts)), key=lambda i: int(torch.isneginf(ctx.logits[layer][i]).sum()))
    images = [first] + ([most_inf] if most_inf != first else [])
    maps = [_heatmap(ctx, layer, i) for i in images]
    return {
        **maps[0],
        "heatmaps": maps,
        "inf_per_layer": {k: int(torch.isneginf(v).sum()) for k, v in ctx.logits.items()},
        "nan_per_layer": {k: int(torch.isnan(v).sum()) for k, v in ctx.logits.items()},
    }


def inspect_replay(
    replay: Replay,
    *,
    criterion: Any = None,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    trace: bool = False,
    amp: str | None = None,
    train_mode: bool | None = None,
    rng: Mapping[str, Any] | None = None,
) -> Result:
    """Run the analyzers on a prepared replay.

    amp: 'fp16' or 'bf16' replays the forward under autocast (as AMP training runs it); None runs it in
    the model's own dtype. Per-module activation magnitudes (NS303) are collected on the same forward.
    train_mode: forward in training mode (dropout and drop-path draw masks), with the generator states
    `rng` (`load_rng` of a dump's rng.pt) set before each forward; None keeps the replay's own setting.
    """
    if train_mode is not None or rng is not None:
        replay = dataclasses.replace(replay, train_mode=replay.train_mode if train_mode is None else train_mode,
                                     rng=rng if rng is not None else replay.rng)
    select = check_codes(select) if select else None
    ignore = check_codes(ignore) if ignore else None
    dtype = amp_dtype(amp)
    want_stats = _wants(("NS303", "NS311"), select, ignore)
    with contextlib.ExitStack() as stack:
        if dtype is not None:
            stack.enter_context(torch.autocast(device_type=replay.device.type, dtype=dtype))
        stats = stack.enter_context(module_stats(replay.model, check_inputs=dtype is not None)) if want_stats else None
        with progress.stage("replaying the batch", f"replayed the batch ({len(replay.batch)} images)"):
            record = replay.forward(detach=True)
    ctx = build_context(replay, record)
    ctx.autocast_dtype = dtype
    ctx.module_stats = stats.result() if stats is not None else None
    terms: dict[str, float] = {}
    if criterion:
        crit, name = replay.criterion(criterion)
        outputs = record.to_outputs()
        targets = replay.targets()
        extras = replay.criterion_extras()
        ctx.criterion_name = name
        try:
            with torch.no_grad():
                ctx.loss_terms = call_criterion(crit, outputs, targets, name=name, extras=extras)
                if ctx.text_mask is not None:
                    ctx.loss_terms_padding_sanitized = call_criterion(
                        crit, sanitize_padding(outputs, ctx.text_mask), targets, name=name, extras=extras)
        except CriterionError as exc:
            if is_untruncated_width_failure(exc, replay.texts, replay.max_text_len):
                ctx.loss_terms = ctx.loss_terms_padding_sanitized = None  # NS406 names it
                ctx.notes["criterion_shape_error"] = str(exc)
            elif not (is_matching_failure(exc) or is_label_failure(exc)):
                raise
            else:
                # The matcher refused non-finite costs (NS203), or class labels index past the label maps
                # (NS111/NS112): those findings report it, with the causes ranked above it.
                ctx.loss_terms = ctx.loss_terms_padding_sanitized = None
                box = box_assertion(exc)
                note = (f"{box} asserted that every box has x1 >= x0 and y1 >= y0, which is false for NaN boxes "
                        f"({exc})" if box else str(exc))
                ctx.notes["criterion_label_error" if is_label_failure(exc) else "criterion_error"] = note
        if ctx.loss_terms is not None:
            terms = {k: float(v.detach().float().sum()) for k, v in ctx.loss_terms.items()}
            if _wants(SUPERVISION_CODES, select, ignore):
                ctx.supervision = probe_criterion(crit, name, outputs, targets, replay.texts, extras)
    if trace:
        with progress.stage("tracing the first non-finite operation", "traced the first non-finite operation"):
            ctx.trace = run_trace(replay, criterion)  # in the model's dtype: see NS303 for autocast overflows
    with progress.stage("running the analyzers", "ran the analyzers"):
        findings = run_analyzers(ctx, select=select, ignore=ignore)
    summary = {
        "images": len(replay.batch),
        "boxes": replay.batch.num_boxes,
        "decoder_layers": record.num_layers,
        "encoder_proposals": record.has_encoder,
        "queries": int(record.layer_logits[-1].shape[1]) if record.layer_logits else 0,
        "max_text_len": replay.max_text_len,
        "tokens_per_image": [t.num_tokens for t in replay.texts],
        "valid_tokens_per_image": ([int(x) for x in record.text_token_mask.sum(1).tolist()]
                                   if record.text_token_mask is not None else None),
        "criterion": ctx.criterion_name,
        "criterion_error": (ctx.notes.get("criterion_error") or ctx.notes.get("criterion_label_error")
                            or ctx.notes.get("criterion_shape_error")),
        "autocast": amp,
        "mode": "train" if replay.train_mode else "eval",
        "rng_restored": bool(replay.train_mode and replay.rng is not None),
    }
    return Result(kind="inspect", findings=findings, summary=summary, inputs=dict(replay.inputs),
                  environment=environment(str(replay.device)), loss_terms=terms,
                  artifacts=figure_artifacts(ctx))


def run_trace(replay: Replay, criterion: Any) -> Any:
    """The op-level origin trace of forward + loss + backward (NS301/NS302)."""
    from nanscope.trace.tracer import trace_nonfinite

    crit = replay.criterion(criterion)[0] if criterion else None
    targets = replay.targets()
    args, kwargs = replay.model_call()
    assert replay.stack is not None

    def run() -> Any:
        with replay.mode(), replay.stack.capture(replay.model, detach=False) as cap:  # type: ignore[union-attr]
            replay.model(*args, **kwargs)
        outputs = cap.last.to_outputs()
        if crit is None:
            return {"pred_logits_sum": outputs["pred_logits"].float().sum()}
        return call_criterion(crit, outputs, targets, extras=replay.criterion_extras())

    try:
        return trace_nonfinite(replay.model, run, backward=crit is not None)
    except CriterionError as exc:
        if crit is None or not (is_matching_failure(exc) or is_label_failure(exc)):
            raise
        # The loss cannot be built (non-finite matching costs): the forward origin is what matters.
        return run_trace(replay, None)


def inspect(
    checkpoint: str | os.PathLike[str],
    batch: str | os.PathLike[str] | Batch,
    *,
    config: str | os.PathLike[str] | None = None,
    text_encoder: str | None = None,
    device: str | None = "cpu",
    criterion: Any = None,
    trust_checkpoint: bool = False,
    stack: str | None = None,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    trace: bool = False,
    amp: str | None = None,
    adapter: str | os.PathLike[str] | None = None,
    merge_lora: bool = False,
    train_mode: bool = False,
    rng: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> Result:
    """Replay `batch` through the GroundingDINO in `checkpoint` and diagnose it. Never prints.

    adapter: a PEFT adapter folder or file on top of `checkpoint`; merge_lora merges it before the replay.
    train_mode, rng: see `inspect_replay`; `rng` may be the path of a dump's rng.pt."""
    from functools import partial

    from nanscope.preflight import criterion as checked_criterion
    from nanscope.stacks.formats.saved_args import saved_args

    amp_dtype(amp)  # bad input fails before the model is built
    select = check_codes(select) if select else None
    ignore = check_codes(ignore) if ignore else None
    with collect_user_stdout() as early:  # what the criterion module prints when imported
        crit = checked_criterion(criterion, "--criterion",  # --config is checked first thing in `prepare`
                                 partial(saved_args, checkpoint, trust=trust_checkpoint))
    if isinstance(rng, (str, os.PathLike)):
        rng = load_rng(rng)
    with collect_model_stdout() as model_out:  # groundingdino prints `output layer_id 0 is nan`: keep it
        replay = prepare(checkpoint, batch, config=config, text_encoder=text_encoder, device=device,
                         trust_checkpoint=trust_checkpoint, stack=stack, adapter=adapter,
                         merge_lora=merge_lora)
        with collect_user_stdout() as out:  # the criterion's prints go in their own block of the report
            result = inspect_replay(replay, criterion=crit, select=select, ignore=ignore, trace=trace, amp=amp,
                                    train_mode=train_mode, rng=rng)
    result.user_stdout = early.text + out.text
    result.model_stdout = model_out.text
    return result
