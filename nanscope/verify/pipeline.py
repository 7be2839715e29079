"""`nanscope verify-fix`: prove that a fixed criterion removes the NaN of padded text positions, and nothing else.

One batch is replayed through the user's GroundingDINO with gradients on. The "before" criterion
(default: nanscope's `NaiveCriterion` for the preset) and the "after" criterion (default:
`SetCriterion`) run on the same outputs and each is backpropagated into the model with fresh
gradients; then a few AdamW steps train a copy of the model (eval mode, so deterministic) with
each. `nanscope.verify.checks` turns that into ten checks; `nanscope.verify.peak_memory` says how memory
is measured.

Totals weight the terms with the criterion's `weight_dict` when it has one (DETR convention), else
sum the loss terms (tensors that require grad; metrics such as `class_error` are shown, not summed).
Extra parameters of the criteria and their matchers are filled by name (`Replay.criterion_extras`).
What the user's code prints is captured into `Result.user_stdout`. A criterion that cannot be
imported, or raises on the replayed batch, raises `CriterionError` naming the user's frame (the CLI
exits 2). The verdict is "fixed" when the `REQUIRED` checks pass; `summary["verdict_detail"]` says
what else differs (checks 4-7).
"""

from __future__ import annotations

import copy
import math
import os
from functools import partial
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from nanscope import progress
from nanscope.errors import CriterionError, InputError
from nanscope.replay.batch import Batch
from nanscope.replay.session import Replay, prepare
from nanscope.result import Result, environment
from nanscope.user_code import (
    Criterion,
    call_criterion,
    collect_model_stdout,
    collect_user_stdout,
    user_frame,
)
from nanscope.terms import term_layer
from nanscope.verify.checks import (
    EQUIVALENCE,
    MEMORY_LIMIT,
    REQUIRED,
    CriterionRun,
    Outputs,
    Targets,
    TrainLog,
    check_after_finite,
    check_gradients,
    check_memory,
    check_reproduced,
    check_training,
    floats,
    layers,
    loss_keys,
    valid_positions,
)
from nanscope.verify.equivalence import (
    check_matching,
    check_no_op,
    check_reference,
    check_valid_only,
)
from nanscope.stacks.formats.saved_args import saved_args
from nanscope.verify.denormals import flush_denormals
from nanscope.verify.peak_memory import PeakMemory
from nanscope.verify.supervision_check import check_supervision

LR = 1e-4  # AdamW learning rate of the training steps: a typical GroundingDINO fine-tuning rate
DEFAULT_STEPS = 5  # enough for the loss to move; each step is a forward and backward of the whole model


def weighted_total(crit: Any, terms: Mapping[str, Tensor], keys: Any = None) -> Tensor:
    """Weighted sum with `crit.weight_dict` (terms it lacks are left out, as DETR does), else the plain sum
    of the loss terms `keys` (default: `loss_keys(crit, terms)`)."""
    weights = getattr(crit, "weight_dict", None)
    if isinstance(weights, Mapping):
        used = [(float(weights[k]), v) for k, v in terms.items() if k in weights]
        if used:
            return sum(w * v.sum() for w, v in used)  # type: ignore[return-value]
    keys = loss_keys(crit, terms) if keys is None else keys
    return sum(v.sum() for k, v in terms.items() if k in keys)  # type: ignore[return-value]


def _tap_output(store: dict[str, Tensor], key: str, grad: Tensor) -> None:
    store[key] = (~torch.isfinite(grad)).sum()


def _tap_param(order: list[tuple[str, Tensor]], name: str, param: Tensor) -> None:
    order.append((name, torch.isfinite(param.grad).all()))


def _differentiable_tensors(outputs: Outputs) -> dict[str, Tensor]:
    return {f"{layer}.{k}": d[k] for layer, d in layers(outputs) for k in ("pred_logits", "pred_boxes")
            if isinstance(d.get(k), Tensor) and d[k].requires_grad}


def reproduces_bug(exc: CriterionError) -> bool:
    """A criterion raising this on the batch is the bug reproduced, not bad input: transformers' loss indexing
    another image's phrases (NS111), a matcher refusing non-finite costs (NS203)."""
    from nanscope.replay.diagnose import is_label_failure, is_matching_failure

    return is_label_failure(exc) or is_matching_failure(exc)


def run_criterion(model: nn.Module, crit: Criterion, name: str, outputs: Outputs, targets: Targets,
                  extras: Mapping[str, Any] | None = None, *, may_raise: bool = False) -> CriterionRun:
    """Compute `crit` on `outputs`, backpropagate its total into `model` (grads reset first; graph kept).

    may_raise: an exception that `reproduces_bug` gives a run with `raised` set (no terms, total NaN)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in params:
        p.grad = None
    tensors = _differentiable_tensors(outputs)
    grads: dict[str, Tensor] = {}
    order: list[tuple[str, Tensor]] = []
    handles = []
    try:
        handles += [t.register_hook(partial(_tap_output, grads, k)) for k, t in tensors.items()]
        handles += [p.register_post_accumulate_grad_hook(partial(_tap_param, order, n)) for n, p in params]
        with PeakMemory(outputs["pred_logits"].device) as mem:
            try:
                terms = call_criterion(crit, outputs, targets, name=name, extras=extras)
            except CriterionError as exc:
                if not (may_raise and reproduces_bug(exc)):
                    raise
                return CriterionRun(terms={}, total=math.nan, differentiable=False,
                                    output_grads={k: None for k in tensors}, nonfinite_params=[], params_with_grad=0,
                                    params_total=len(params), loss_peak=0, peak=0, raised=_raised_text(exc))
            keys = loss_keys(crit, terms)
            total = weighted_total(crit, terms, keys)
            loss_peak = mem.peak_so_far()
            if total.requires_grad:
                try:
                    total.backward(retain_graph=True)
                except Exception as exc:
                    raise CriterionError(f"{name}: backward raised {type(exc).__name__}: {exc} "
                                         f"(at {user_frame(exc)})") from None
    finally:
        for h in handles:
            h.remove()
    run = CriterionRun(terms=floats(terms, keys), total=float(total.detach().float()),
                       differentiable=bool(getattr(total, "requires_grad", False)),
                       output_grads={k: (int(grads[k]) if k in grads else None) for k in tensors},
                       nonfinite_params=[n for n, ok in order if not bool(ok)], params_with_grad=len(order),
                       params_total=len(params), loss_peak=int(loss_peak), peak=int(mem.peak_bytes),
                       metrics={k: v for k, v in floats(terms).items() if k not in keys}, loss_keys=keys)
    for _, p in params:
        p.grad = None
    return run


def train_steps(replay: Replay, crit: Criterion, name: str, steps: int, lr: float = LR,
                extras: Mapping[str, Any] | None = None, flush: bool = True) -> TrainLog:
    """AdamW steps on a copy of the replayed model (eval mode) with `crit`.

    Returns (total loss at each step before its update, the first step with a non-finite term or
    None, those terms). Stops at the first non-finite step. On CPU the steps run with denormals
    flushed to zero unless `flush` is False (`nanscope.verify.denormals`: the mode is restored after).
    """
    with flush_denormals(flush and replay.device.type == "cpu"):
        return _train_steps(replay, crit, name, steps, lr, extras)


def _train_steps(replay: Replay, crit: Criterion, name: str, steps: int, lr: float,
                 extras: Mapping[str, Any] | None) -> TrainLog:
    model = copy.deepcopy(replay.model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    args, kwargs = replay.model_call()
    targets = replay.targets()
    assert replay.stack is not None
    totals: list[float] = []
    for step in range(steps):
        progress.step(step + 1, steps, f"training with {name.split(' ')[0]} (check 8)")
        with torch.enable_grad(), replay.stack.capture(model, detach=False) as cap:
            model(*args, **kwargs)
        terms = call_criterion(crit, cap.last.to_outputs(), targets, name=name, extras=extras)
        keys = loss_keys(crit, terms)
        total = weighted_total(crit, terms, keys)
        totals.append(float(total.detach().float()))
        bad = [k for k in keys if not bool(torch.isfinite(terms[k]).all())]
        if bad or not math.isfinite(totals[-1]):
            return totals, step, bad or ["total"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return totals, None, []


def _raised_text(exc: CriterionError) -> str:
    """`transformers' GroundingDino loss raised IndexError: ...` without nanscope's own frame."""
    text = str(exc)
    inner = text.split(" raised ", 1)[1] if " raised " in text else text
    inner = inner.split(": ", 1)[1] if inner.startswith(("TransformersLabelError", "MatchingError")) else inner
    return inner.rsplit(" (at /", 1)[0] if "nanscope/" in inner.rsplit(" (at /", 1)[-1] else inner


def _nonfinite_at_zero(run: CriterionRun) -> TrainLog:
    if run.raised:
        return [], 0, ["raised " + run.raised.split(":", 1)[0].rsplit(" ", 1)[-1]]
    return [run.total], 0, [k for k, v in run.terms.items() if not math.isfinite(v)] or ["total"]


def default_criteria(preset: str) -> tuple[tuple[Criterion, str], tuple[Criterion, str]]:
    from nanscope.criterion.set_criterion import NaiveCriterion, SetCriterion

    return ((NaiveCriterion(preset), f"nanscope NaiveCriterion(preset={preset!r})"),
            (SetCriterion(preset), f"nanscope SetCriterion(preset={preset!r})"))


def _terms_table(before: CriterionRun, after: CriterionRun, last: str) -> list[dict[str, Any]]:
    keys = list(before.terms) + [k for k in after.terms if k not in before.terms]
    rows = [{"term": k, "layer": term_layer(k, last), "before": before.terms.get(k), "after": after.terms.get(k)}
            for k in keys]
    rows.append({"term": "total (weighted)", "layer": "all", "before": before.total, "after": after.total})
    mb, ma = before.metrics or {}, after.metrics or {}
    for k in list(mb) + [k for k in ma if k not in mb]:  # shown, never checked
        rows.append({"term": f"{k} (metric, not a loss term)", "layer": term_layer(k, last), "before": mb.get(k),
                     "after": ma.get(k), "metric": True})
    return rows


def verdict_detail(checks: list[Any], preset: str) -> str:
    """'no non-finite term, differs from the hf reference by ...' when only equivalence checks fail."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        return ""
    if any(c.id in REQUIRED for c in failed):
        return "not fixed: " + "; ".join(f"check {c.id} {c.name}" for c in failed if c.id in REQUIRED)
    parts = []
    ref = next((c for c in failed if c.id == 4), None)
    if ref is not None:
        closest = ref.numbers.get("closest", preset)
        parts.append(ref.numbers.get("why") or f"differs from the {closest} reference")
    others = [str(c.id) for c in failed if c.id in EQUIVALENCE and c.id != 4]
    if others:
        parts.append(f"and from before (check{'s' if len(others) > 1 else ''} {', '.join(others)})")
    return "fixed: no non-finite term, " + "; ".join(parts)


def resolve_criteria(before: Any, after: Any, preset: str | None,
                     steps: int, saved_args: Any = None) -> tuple[Any, Any]:
    """Validate the options and load both criteria (before any model is built, so mistakes fail fast).

    A bare name without ':' (a criterion a stack ships, e.g. 'transformers') and a None (nanscope's
    default for the preset) are kept as they are: `verify_replay` resolves them with the replay.
    """
    from nanscope.criterion.presets import get_preset

    if preset is not None:
        get_preset(preset)  # an unknown preset is an InputError listing the valid ones
    if steps < 2:
        raise InputError(f"--steps {steps} given; at least 2 are needed to compare the first and last loss")

    from nanscope.preflight import criterion

    return criterion(before, "--before", saved_args), criterion(after, "--after", saved_args)


def _resolve(replay: Replay, spec: Any, default: tuple[Criterion, str]) -> tuple[Criterion, str]:
    return default if spec is None else replay.criterion(spec)


def term_families(crit: Any) -> tuple[bool, bool] | None:
    """(auxiliary decoder terms `loss_*_0`.., encoder terms `loss_*_enc`) a criterion computes, read from its
    `weight_dict` (DETR convention: the keys are the terms); None when it has none to read."""
    import re

    weights = getattr(crit, "weight_dict", None)
    keys = list(weights) if isinstance(weights, Mapping) else []
    if not keys:
        return None
    return (any(re.search(r"_\d+$", k) for k in keys), any(k.endswith(("_enc", "_interm")) for k in keys))


def default_after_like(before: Criterion, preset: str, default: tuple[Criterion, str]) -> tuple[Criterion, str]:
    """nanscope's SetCriterion for `preset`, computing the term families `before` computes (its auxiliary and
    encoder terms) besides the preset's own, so checks 5 and 6 compare like with like; `default` when
    before's families cannot be read or the default already has them."""
    from nanscope.criterion.set_criterion import SetCriterion

    fam = term_families(before)
    crit = default[0]
    if fam is None:
        return default
    # only added: a weight_dict may list just the base terms of a criterion that computes more, and after's
    # extra terms are not compared (checks 5 and 6 compare before's terms)
    aux, enc = crit.aux_loss or fam[0], crit.enc_loss or fam[1]
    if (aux, enc) == (crit.aux_loss, crit.enc_loss):
        return default
    return (SetCriterion(preset, aux_loss=aux, enc_loss=enc),
            f"nanscope SetCriterion(preset={preset!r}, aux_loss={aux}, enc_loss={enc}) (the term families of before)")


def verify_replay(replay: Replay, *, before: Any = None, after: Any = None, preset: str | None = None,
                  steps: int = DEFAULT_STEPS) -> Result:
    """Run the ten checks on a prepared replay (its model is only read: steps train a copy). Never prints.

    `before` / `after`: a `MODULE:ATTR` spec (see `nanscope.user_code`), a short name the replay's stack
    ships ('transformers'), a loaded `(criterion, name)`, or None for nanscope's NaiveCriterion /
    SetCriterion of `preset`. `preset` None: the stack's default (groundingdino-py 'mmdet', transformers
    'hf'). What the criteria print is in `result.user_stdout`.
    """
    assert replay.stack is not None
    preset = preset or replay.stack.preset_for(replay.model)
    with collect_user_stdout() as out:
        spec_b, spec_a = resolve_criteria(before, after, preset, steps, replay.saved_args)
        default_b, default_a = default_criteria(preset)
        crit_b = _resolve(replay, spec_b, default_b)
        crit_a = (_resolve(replay, spec_a, default_a) if spec_a is not None
                  else default_after_like(crit_b[0], preset, default_a) if spec_b is not None else default_a)
        criteria = (crit_b, crit_a)
        result = _verify(replay, criteria, preset, steps)
    result.user_stdout = out.text + result.user_stdout
    return result


def _verify(replay: Replay, criteria: tuple[tuple[Criterion, str], tuple[Criterion, str]], preset: str,
            steps: int) -> Result:
    assert replay.stack is not None
    crit_b, crit_a = criteria
    name_b, name_a = f"before ({crit_b[1]})", f"after ({crit_a[1]})"
    targets = replay.targets()
    num_boxes = sum(int(t["boxes"].shape[0]) for t in targets)

    extras = replay.criterion_extras()
    with progress.stage("replaying the batch with gradients", f"replayed the batch ({len(replay.batch)} images)"):
        record = replay.forward(detach=False, grad=True)
    outputs = record.to_outputs()
    with progress.stage("backpropagating before", "backpropagated before"):
        run_b = run_criterion(replay.model, crit_b[0], name_b, outputs, targets, extras, may_raise=True)
    with progress.stage("backpropagating after", "backpropagated after"):
        run_a = run_criterion(replay.model, crit_a[0], name_a, outputs, targets, extras)
    checks = [check_reproduced(run_b, crit_b[1]), check_after_finite(run_a, num_boxes),
              check_gradients(run_b, run_a),
              check_reference(run_a, outputs, targets, preset, stack_reference=replay.stack.reference_criterion(preset),
                              after_criterion=crit_a, extras=extras),
              check_valid_only(crit_b[0], name_b, run_a, outputs, targets, before=run_b, extras=extras),
              check_no_op((crit_b[0], name_b), (crit_a[0], name_a), outputs, targets, extras=extras,
                          keys=(run_b.loss_keys, run_a.loss_keys)),
              check_matching((crit_b[0], name_b), (crit_a[0], name_a), outputs, targets, extras=extras)]
    supervision = check_supervision(crit_a[0], name_a, outputs, targets, replay.batch, replay.texts,
                                    finite=run_a.finite, extras=extras, before=(crit_b[0], name_b))
    valid_tokens = [int(x) for x in valid_positions(outputs).sum(1).tolist()]
    layer_names = [name for name, _ in layers(outputs)]
    del record, outputs  # frees the replay's graph before training a copy

    # Step 0 is the replayed forward itself: a criterion already non-finite there is not trained.
    after_steps = (train_steps(replay, crit_a[0], name_a, steps, extras=extras) if run_a.finite
                   else _nonfinite_at_zero(run_a))
    before_steps = (train_steps(replay, crit_b[0], name_b, steps, extras=extras) if run_b.finite
                    else _nonfinite_at_zero(run_b))
    checks.append(check_training(after_steps, before_steps, steps, LR))
    method = PeakMemory(replay.device).method
    checks.append(check_memory(run_b, run_a, method))
    checks.append(supervision)

    last = [n for n in layer_names if n != "enc"][-1]
    n_rows = max(len(after_steps[0]), len(before_steps[0]))
    step_rows = [{"step": s, "after": after_steps[0][s] if s < len(after_steps[0]) else None,
                  "before": before_steps[0][s] if s < len(before_steps[0]) else None} for s in range(n_rows)]
    tables = {
        "terms": _terms_table(run_b, run_a, last),
        "steps": step_rows,
        "memory": {"method": method, "device": str(replay.device), "before_bytes": run_b.peak,
                   "after_bytes": run_a.peak, "before_loss_bytes": run_b.loss_peak,
                   "after_loss_bytes": run_a.loss_peak, "ratio": checks[8].numbers["ratio"], "limit": MEMORY_LIMIT},
    }
    summary = {"preset": preset, "before": crit_b[1], "after": crit_a[1], "steps": steps, "lr": LR,
               "images": len(replay.batch), "boxes": num_boxes, "layers": layer_names,
               "valid_tokens_per_image": valid_tokens, "before_nonfinite_step": before_steps[1],
               "required_checks": list(REQUIRED), "verdict_detail": verdict_detail(checks, preset)}
    inputs = {**replay.inputs, "before": crit_b[1], "after": crit_a[1], "preset": preset}
    return Result(kind="verify-fix", checks=checks, summary=summary, inputs=inputs,
                  environment=environment(str(replay.device)), tables=tables)


def verify_fix(
    checkpoint: str | os.PathLike[str],
    batch: str | os.PathLike[str] | Batch,
    *,
    before: str | None = None,
    after: str | None = None,
    preset: str | None = None,
    steps: int = DEFAULT_STEPS,
    config: str | os.PathLike[str] | None = None,
    text_encoder: str | None = None,
    device: str | None = "cpu",
    trust_checkpoint: bool = False,
    stack: str | None = None,
    adapter: str | os.PathLike[str] | None = None,
    merge_lora: bool = False,
) -> Result:
    """Replay `batch` through the GroundingDINO in `checkpoint` and run the ten checks. Never prints.

    adapter: a PEFT adapter folder or file on top of `checkpoint`; merge_lora merges it before the replay.

    `before` / `after` are `MODULE:ATTR` specs (see `nanscope.user_code`) or a short name the stack
    ships ('transformers'); None uses nanscope's NaiveCriterion / SetCriterion for `preset` (None: the
    stack's default preset).
    """
    with collect_user_stdout() as out:  # the user's module-level prints at import time
        criteria = resolve_criteria(before, after, preset, steps,
                                    partial(saved_args, checkpoint, trust=trust_checkpoint))
    with collect_model_stdout() as model_out:  # groundingdino's own NaN prints: kept for the report
        replay = prepare(checkpoint, batch, config=config, text_encoder=text_encoder, device=device,
                         trust_checkpoint=trust_checkpoint, stack=stack, adapter=adapter,
                         merge_lora=merge_lora)
        result = verify_replay(replay, before=criteria[0], after=criteria[1], preset=preset, steps=steps)
    result.user_stdout = out.text + result.user_stdout
    result.model_stdout = model_out.text
    return result

