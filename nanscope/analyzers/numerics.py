"""Numbers that are broken before any loss: NS303 half-precision overflow risk, NS304 non-finite input
images, NS305 non-finite parameters or buffers in the checkpoint, NS310 images that are all padding, NS311
activations that exploded past float32's safe range."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import register
from nanscope.findings import Finding, Severity
from nanscope.replay.module_stats import FP16_MAX, ModuleStat, dense_flat, half_limit

MAX_WHERE = 8  # locations listed per finding; `count` has them all
# NS303 flags modules whose largest |activation| is above the fp16 maximum divided by this margin
# (65504 / 4 = 16376): one residual add of two such values, a sum of a few of them or a product in
# the next op goes past 65504, so a model that measures there in fp32 is one step from inf in fp16.
RISK_FACTOR = 4.0
# Modules that write -inf on purpose: ContrastiveEmbed masks padded text positions with -inf.
EXPECTED_NONFINITE = ("ContrastiveEmbed",)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32") if dtype is not None else "fp32"


@register("NS303", needs=("module_stats",))
def half_precision_risk(ctx: AnalysisContext) -> list[Finding]:
    stats: list[ModuleStat] = list(ctx.module_stats)
    amp = ctx.autocast_dtype
    limit = half_limit(amp, RISK_FACTOR)
    overflowed: list[ModuleStat] = []
    for s in stats:  # completion order: a child that overflowed comes before the parents that contain it
        if amp is None or not s.new_nonfinite or s.kind in EXPECTED_NONFINITE or s.dtype != str(amp):
            continue
        if not any(o.name.startswith(s.name + ".") or not s.name for o in overflowed):
            overflowed.append(s)
    # Under autocast only outputs in the half dtype are at risk: modules that autocast leaves in float32
    # (groundingdino runs its decoder FFN with autocast disabled) are fine at any magnitude.
    near = [s for s in stats if s.max_abs > limit and s not in overflowed and (amp is None or s.dtype == str(amp))]
    if not overflowed and not near:
        return []
    where: list[dict[str, Any]] = []
    for s in overflowed:
        where.append({"module": s.name or "(model)", "kind": s.kind, "dtype": s.dtype,
                      "why": f"{s.nonfinite} non-finite output value(s) from finite inputs"})
    for s in near:
        why = "beyond the fp16 range" if s.max_abs > FP16_MAX else f"within {RISK_FACTOR:g}x of the fp16 maximum"
        if amp == torch.bfloat16:
            why = f"within {RISK_FACTOR:g}x of the bf16 maximum"
        where.append({"module": s.name or "(model)", "kind": s.kind, "max_abs": float(f"{s.max_abs:.4g}"), "why": why})
    first = where[0]["module"]
    run = f"under {_dtype_name(amp)} autocast" if amp is not None else "in float32 (no autocast)"
    if overflowed:
        msg = (f"{len(overflowed)} module(s) produced inf/NaN from finite inputs {run}; the first in the forward "
               f"is {first}.")
        severity = Severity.ERROR
    else:
        top = max(near, key=lambda s: s.max_abs)
        msg = (f"{len(near)} module(s) reach |activation| above {limit:.6g} ({'the bf16' if amp == torch.bfloat16 else 'the fp16'} "
               f"maximum / {RISK_FACTOR:g}) measured {run}; the first in the forward is {first}, the largest "
               f"{top.name or '(model)'} at {top.max_abs:.4g}.")
        if amp is None:
            msg += (" Fine in float32 and bfloat16; under fp16 autocast these overflow or come close (an AMP "
                    "overflow waiting to happen), unless they run with autocast disabled: rerun with --amp fp16 "
                    "to confirm.")
        severity = Severity.WARNING
    data = {"limit": limit, "factor": RISK_FACTOR, "autocast": _dtype_name(amp),
            "modules": [[s.name, s.kind, s.max_abs, s.nonfinite] for s in overflowed + near]}
    return [Finding("NS303", severity, len(overflowed) + len(near), msg, tuple(where[:MAX_WHERE]), data=data)]


@register("NS311", needs=("module_stats",))
def exploded_activation(ctx: AnalysisContext) -> list[Finding]:
    """The first module (in forward order) whose output is finite but past sqrt(float max): a square, a
    variance or a product of two such values overflows, so the first NaN (NS301, e.g. in a layer_norm) comes
    after it. A module whose own weights hold such magnitudes is the diverged one; its parents carry the same
    values and are not listed."""
    stats: list[ModuleStat] = list(ctx.module_stats)
    hits: list[ModuleStat] = []
    for s in stats:  # completion order: a child before the parents that contain it
        dtype = _float_dtype(s.dtype)
        if dtype is None or not s.max_abs >= exploded_limit(dtype):
            continue
        if any(h.name.startswith(s.name + ".") or not s.name for h in hits):
            continue  # a parent of a module already listed
        hits.append(s)
    if not hits:
        return []
    modules = dict(ctx.model.named_modules()) if ctx.model is not None else {}
    where: list[dict[str, Any]] = []
    for k, s in enumerate(hits):
        w: dict[str, Any] = {"module": s.name or "(model)", "kind": s.kind, "max_abs": float(f"{s.max_abs:.4g}")}
        weight = _largest_weight(modules.get(s.name))
        if weight is not None:
            w["weight"], w["weight_max_abs"] = weight[0], float(f"{weight[1]:.4g}")
        # after the first, only modules whose own weights exploded: the others pass the first one's values on
        if k == 0 or (weight is not None and weight[1] >= exploded_limit(_float_dtype(s.dtype))):
            where.append(w)
    first = where[0]
    own = (f"; its own {first['weight']} holds |w| up to {first['weight_max_abs']:.4g}" if "weight" in first else "")
    msg = (f"{first['module']} ({first['kind']}) returns finite values up to |{first['max_abs']:.4g}|, past "
           f"sqrt({_dtype_label(hits[0].dtype)} max) = {exploded_limit(_float_dtype(hits[0].dtype)):.3g}{own}: "
           "the next square, variance or product of two such values overflows, so the first NaN downstream is a "
           "consequence." + (f" {len(where) - 1} more module(s) with exploded weights." if len(where) > 1 else ""))
    return [Finding("NS311", Severity.WARNING, len(where), msg, tuple(where[:MAX_WHERE]),
                    data={"modules": [[s.name, s.kind, s.max_abs] for s in hits]})]


def exploded_limit(dtype: torch.dtype) -> float:
    """sqrt of the dtype's largest finite value: 1.84e19 for float32 (and bfloat16)."""
    return math.sqrt(float(torch.finfo(dtype).max))


def _float_dtype(name: str) -> torch.dtype | None:
    """The output's dtype when it has float32's range or more; float16 overflows are NS303's."""
    dtype = getattr(torch, name.removeprefix("torch."), None) if name else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype == torch.float16:
        return None
    return dtype


def _dtype_label(name: str) -> str:
    return name.removeprefix("torch.")


def _largest_weight(module: Any) -> tuple[str, float] | None:
    """(name, largest finite |value|) of the module's own parameter with the largest values."""
    if module is None:
        return None
    best: tuple[str, float] | None = None
    for name, p in module.named_parameters(recurse=False):
        if p.numel() and p.is_floating_point():
            a = p.detach().abs()
            m = float(torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype)).amax())
            if best is None or m > best[1]:
                best = (name, m)
    return best


@register("NS310")
def all_padding_images(ctx: AnalysisContext) -> list[Finding]:
    masks = ctx.batch.image_masks  # [B, H, W] bool, True on padded pixels
    if masks is None:
        return []
    padded = masks.flatten(1).all(1).cpu()  # [B]
    images = padded.nonzero().flatten().tolist()
    if not images:
        return []
    h, w = masks.shape[-2:]
    msg = (f"{len(images)} of {masks.shape[0]} image(s) are all padding (image_masks is True on all {h}x{w} "
           f"pixels): {', '.join(f'image {i}' for i in images)}. Their valid ratio is 0, and groundingdino divides "
           "by it (get_reference_points): every box and logit of the batch becomes NaN.")
    return [Finding("NS310", Severity.ERROR, len(images), msg, tuple({"image": i} for i in images[:MAX_WHERE]))]


@register("NS304")
def nonfinite_images(ctx: AnalysisContext) -> list[Finding]:
    images = ctx.batch.images.detach()  # [B, 3, H, W]
    nan = torch.isnan(images).flatten(2).sum(-1).cpu()  # [B, 3]
    inf = torch.isinf(images).flatten(2).sum(-1).cpu()  # [B, 3]
    bad = nan + inf
    if int(bad.sum()) == 0:
        return []
    where = []
    for i, c in bad.nonzero().tolist():
        kind = "+".join(k for k, n in (("nan", int(nan[i, c])), ("inf", int(inf[i, c]))) if n)
        where.append({"image": i, "channel": c, "pixels": int(bad[i, c]), "value": kind})
    per_image = bad.sum(-1)
    n_img = int((per_image > 0).sum())
    msg = (f"{int(bad.sum())} non-finite pixel value(s) ({int(nan.sum())} NaN, {int(inf.sum())} inf) in {n_img} of "
           f"{images.shape[0]} image(s), {len(where)} (image, channel) pair(s): every activation, box and loss "
           "of those images becomes NaN.")
    data = {"per_image": per_image.tolist(), "per_channel": bad.tolist()}
    return [Finding("NS304", Severity.ERROR, int(bad.sum()), msg, tuple(where[:MAX_WHERE]), data=data)]


def nonfinite_tensors(state: Mapping[str, Any]) -> list[tuple[str, int, int, int]]:
    """(name, NaN count, inf count, numel) for every floating tensor of `state` holding NaN or inf.

    One `aminmax` pass per tensor (NaN propagates, +-inf shows as an end), stacked and read once per
    device; only the tensors it flags are counted (a second read, only when something is non-finite).
    """
    tensors: list[tuple[str, Tensor]] = []
    ends: dict[torch.device, list[tuple[int, Tensor]]] = {}  # device -> (index, [2] min and max)
    for name, t in state.items():
        if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            t = t.detach()
            values = torch.view_as_real(t) if t.is_complex() else t
            ends.setdefault(t.device, []).append((len(tensors), torch.stack(torch.aminmax(dense_flat(values)))))
            tensors.append((name, t))
    flagged: list[int] = []
    for probes in ends.values():
        finite = torch.isfinite(torch.stack([p.float() for _, p in probes])).all(1).cpu().tolist()  # [n]
        flagged += [k for (k, _), ok in zip(probes, finite) if not ok]
    out = []
    for k in sorted(flagged):
        name, t = tensors[k]
        n_nan, n_inf = torch.stack([torch.isnan(t).sum(), torch.isinf(t).sum()]).cpu().tolist()
        if n_nan or n_inf:
            out.append((name, int(n_nan), int(n_inf), int(t.numel())))
    return out


@register("NS305")
def nonfinite_parameters(ctx: AnalysisContext) -> list[Finding]:
    """Non-finite tensors in the checkpoint (or, without one, in the model's own state dict)."""
    source = "checkpoint"
    state = ctx.state_dict
    if state is None and ctx.model is not None:
        state, source = ctx.model.state_dict(), "model"
    if not state:
        return []
    bad = nonfinite_tensors(state)
    if not bad:
        return []
    where = []
    for name, n_nan, n_inf, numel in bad:
        module = name.rpartition(".")[0]
        where.append({"param": name, "module": module, "nan": n_nan, "inf": n_inf, "of": numel})
    total = sum(n + i for _, n, i, _ in bad)
    msg = (f"{len(bad)} tensor(s) of the {source} hold {total} non-finite value(s): "
           f"{', '.join(name for name, *_ in bad[:3])}{' ...' if len(bad) > 3 else ''}. Every forward through "
           "them is NaN; an earlier training step already diverged (or the file is corrupt).")
    data = {"tensors": [list(b) for b in bad]}
    return [Finding("NS305", Severity.ERROR, len(bad), msg, tuple(where[:MAX_WHERE]), data=data)]
