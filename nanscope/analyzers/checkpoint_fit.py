"""NS306: the checkpoint does not fit the model (groundingdino's strict=False load hides this).

Also how it fits when every key loaded: tied parameters whose values in the file differ (loading keeps
one), dtypes that loading converts (a half-precision file replays in float32), and how the loader
adapted the keys or the model to the file (converted MMDetection names, untied box heads).
"""

from __future__ import annotations

from typing import Any

from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import register
from nanscope.findings import Finding, Severity

SHOW = 5  # key names listed per kind
HALF = ("float16", "bfloat16")


def _converted_sentence(fit: Any) -> str:
    parts = [f"{n} {a} tensor(s) to {b}" for a, b, n in fit.converted]
    text = f"loading converted {', '.join(parts)}"
    if any(a in HALF for a, _, _ in fit.converted):
        text += (" (the file was saved in half precision: the replay runs in the model's dtype, so an overflow "
                 "of half-precision training may not reproduce; replay with --amp fp16 or --amp bf16)")
    return text


def _tied_where(fit: Any) -> list[dict[str, Any]]:
    return [{"param": keys[0], "why": f"tied with {', '.join(keys[1:])}; the file's values differ by up to {d:.3g}"}
            for keys, d in fit.tied_differ[:SHOW]]


@register("NS306", needs=("key_fit",))
def checkpoint_fit(ctx: AnalysisContext) -> list[Finding]:
    fit = ctx.key_fit
    converted = getattr(fit, "converted", ())
    notes = list(getattr(fit, "notes", ()))
    extra = ([_converted_sentence(fit)] if converted else []) + notes
    tail = "".join(f" {s[0].upper()}{s[1:]}." for s in extra)
    data_extra: dict[str, Any] = {"converted": [list(c) for c in converted], "notes": notes}
    if fit.clean:
        if not (fit.benign or extra):
            return []
        where = tuple({"param": k, "why": why} for k, why in fit.benign[:SHOW])
        msg = "every model weight was loaded."
        if fit.benign:
            msg = (f"{len(fit.benign)} key(s) are in the checkpoint or the model only, harmlessly (each one's why "
                   f"in where: {', '.join(k for k, _ in fit.benign[:SHOW])}); {msg}")
        half = any(a in HALF for a, _, _ in converted)
        count = len(fit.benign) + sum(n for _, _, n in converted) + len(notes)
        return [Finding("NS306", Severity.WARNING if half else Severity.INFO, count, msg + tail, where,
                        hint="Replay with --amp matching the training precision." if half else "Nothing to fix.",
                        data={"benign": [list(b) for b in fit.benign], **data_extra})]
    where = [{"param": k, "why": "missing"} for k in fit.missing[:SHOW]]
    where += [{"param": k, "why": "unexpected"} for k in fit.unexpected[:SHOW]]
    where += [{"param": k, "why": f"shape {list(a)} in file, {list(b)} in model"} for k, a, b in fit.mismatched[:SHOW]]
    where += _tied_where(fit)
    tied = len(fit.tied_differ)
    count = len(fit.missing) + len(fit.unexpected) + len(fit.mismatched) + tied
    msg = (f"checkpoint does not fit the model: {len(fit.missing)} missing (left at random init), "
           f"{len(fit.unexpected)} unexpected, {len(fit.mismatched)} mis-shaped keys; "
           f"{len(fit.matched)} loaded.")
    hint = ""
    if tied:
        msg += (f" {tied} group(s) of tied parameters hold different values in the file, and loading keeps only "
                f"one of each ({', '.join(' = '.join(k[:2]) for k, _ in fit.tied_differ[:2])}): the checkpoint "
                "was trained with these parameters untied.")
        hint = ("Build the model with the parameters untied, as it was trained (groundingdino: "
                "dec_pred_bbox_embed_share=False, two_stage_bbox_embed_share=False in the config).")
    msg += tail
    data = {"missing": list(fit.missing), "unexpected": list(fit.unexpected),
            "mismatched": [[k, list(a), list(b)] for k, a, b in fit.mismatched], "matched": len(fit.matched),
            "benign": [list(b) for b in fit.benign],
            "tied_differ": [[list(k), d] for k, d in fit.tied_differ], **data_extra}
    return [Finding("NS306", Severity.ERROR, count, msg, tuple(where), hint=hint, data=data)]


def _mha_out_proj_loras(model: Any) -> list[tuple[str, Any]]:
    """LoRA layers PEFT put on the `out_proj` child of an nn.MultiheadAttention: MHA's forward passes
    `self.out_proj.weight` to F.multi_head_attention_forward and never calls the child, so the LoRA path
    is skipped in the forward and its weights get no gradient."""
    from torch import nn

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            child = getattr(mod, "out_proj", None)
            if child is not None and hasattr(child, "lora_A") and hasattr(child, "base_layer"):
                out.append((f"{name}.out_proj" if name else "out_proj", child))
    return out


@register("NS308", needs=("model",))
def lora_never_trains(ctx: AnalysisContext) -> list[Finding]:
    dead = _mha_out_proj_loras(ctx.model)
    if not dead:
        return []
    names = [n for n, _ in dead]
    params = sum(p.numel() for _, m in dead for n, p in m.named_parameters() if ".lora_" in f".{n}")
    where = tuple({"module": n, "why": "out_proj of nn.MultiheadAttention (read directly as a weight)"}
                  for n in names[:SHOW])
    msg = (f"{len(names)} LoRA target(s) can never train: {', '.join(names[:SHOW])} "
           f"{'is the out_proj' if len(names) == 1 else 'are the out_proj'} of nn.MultiheadAttention, which reads "
           f"out_proj.weight directly; the LoRA path is skipped in the forward and its {params} LoRA weights get "
           "no gradient (lora_B stays at its initialization). A merged replay (--merge-lora) would add it and "
           "differ from what training ran.")
    return [Finding("NS308", Severity.WARNING, len(names), msg, where, data={"modules": names, "lora_params": params})]


@register("NS309", needs=("key_fit",))
def lora_alpha_assumed(ctx: AnalysisContext) -> list[Finding]:
    info = getattr(ctx.key_fit, "adapter", None)
    if info is None or not info.alpha_assumed:
        return []
    msg = (f"the checkpoint holds LoRA weights (r={info.r} from the lora_A shapes, {len(info.targets)} modules) but "
           f"no adapter_config.json was found next to it, so lora_alpha is unknown: the replay assumed PEFT's "
           f"default lora_alpha={info.lora_alpha:g} (scaling {info.scaling:g}). If training used another lora_alpha "
           "(or use_rslora), every LoRA update is scaled differently and the replay is not what training ran.")
    return [Finding("NS309", Severity.WARNING, len(info.targets), msg,
                    ({"param": "lora_alpha", "why": f"assumed {info.lora_alpha:g}"},),
                    data={"r": info.r, "lora_alpha": info.lora_alpha, "targets": list(info.targets)})]
