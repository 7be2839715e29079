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
            msg = (f"{len(fit.benign)} key(s) in the checkpoint are not used by this model and are harmless "
                   f"({', '.join(k for k, _ in fit.benign[:SHOW])}); {msg}")
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
