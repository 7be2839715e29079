"""What `nanscope.watch` reports: the run's `WatchReport`, the error it raises, a dump's manifest and finding.

Everything here is built from `BadStep`, the facts one rank holds about the agreed first bad step;
nothing here reads tensors or touches the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from nanscope.errors import NanscopeError
from nanscope.findings import Finding, Severity
from nanscope.watch.ranks import Agreement
from nanscope.watch.snapshot import MANIFEST_FORMAT, MANIFEST_VERSION, floats

_NOT_TERMS = ("grad_norm", "scale")


@dataclass(frozen=True)
class WatchReport:
    """What the sentinel saw. `failed` is False for a healthy run (overflow-skips are not failures)."""

    steps_checked: int
    rank: int
    world_size: int
    failed: bool = False
    step: int | None = None  # the first bad step, agreed across ranks
    reason: str | None = None  # "nonfinite_loss", "nonfinite_grad", "scale_collapse" or "exception"
    origin_ranks: tuple[int, ...] = ()
    nonfinite_terms: tuple[str, ...] = ()  # on this rank, at `step`
    loss_terms: Mapping[str, float] = field(default_factory=dict)  # on this rank, at `step`
    overflow_skips: int = 0
    overflow_steps: tuple[int, ...] = ()  # the first 100
    last_scale: float | None = None
    dump: Path | None = None
    findings: tuple[Finding, ...] = ()
    exception: str | None = None  # reason "exception": "Type: message" of what the watched block raised
    dump_error: str | None = None  # the dump could not be written: "folder: Type: message" (then `dump` is None)

    @property
    def origin(self) -> bool:
        return self.rank in self.origin_ranks

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps_checked": self.steps_checked, "rank": self.rank, "world_size": self.world_size,
            "failed": self.failed, "step": self.step, "reason": self.reason,
            "origin_ranks": list(self.origin_ranks), "origin": self.origin,
            "nonfinite_terms": list(self.nonfinite_terms),
            "loss_terms": {k: floats(v) for k, v in self.loss_terms.items()},
            "overflow_skips": self.overflow_skips, "overflow_steps": list(self.overflow_steps),
            "last_scale": self.last_scale, "dump": None if self.dump is None else str(self.dump),
            "findings": [f.to_dict() for f in self.findings], "exception": self.exception,
            "dump_error": self.dump_error,
        }


class NonFiniteStepError(NanscopeError):
    """Raised by `Watcher.check` (on every rank, at the same step) once a bad step is confirmed."""

    def __init__(self, report: WatchReport) -> None:
        self.report = report
        what = report.findings[0].message if report.findings else f"step {report.step} went bad"
        where = f"; dump: {report.dump}; replay: nanscope inspect {report.dump}" if report.dump else ""
        if report.dump_error:
            where = f"; the dump could not be written ({report.dump_error})"
        super().__init__(f"{what}{where}")


@dataclass(frozen=True)
class BadStep:
    """What one rank knows about the agreed first bad step."""

    agreement: Agreement
    rank: int
    world_size: int
    local: tuple[int | None, str | None]  # this rank's own first bad step and kind
    batch_step: int | None  # the step whose batch (and values) the dump holds
    weights_step: int | None  # the step whose pre-step weights the dump holds (None: no checkpoint)
    values: Mapping[str, float]  # loss terms, and "grad_norm" / "scale" when watched
    forward: Mapping[str, Any]  # "autocast" and "training" as seen at the step's first forward
    overflow_skips: int
    overflow_steps: tuple[int, ...]
    consecutive_skips: int
    last_scale: float | None
    min_scale: float
    max_consecutive_skips: int
    exception: Mapping[str, str] | None = None  # reason "exception": {"type", "module", "message"}

    @property
    def step(self) -> int:
        return int(self.agreement.step)  # type: ignore[arg-type]

    @property
    def terms(self) -> dict[str, float]:
        return {n: v for n, v in self.values.items() if n not in _NOT_TERMS}

    @property
    def nonfinite_terms(self) -> tuple[str, ...]:
        return tuple(n for n, v in self.terms.items() if not math.isfinite(v))

    def report(self, steps_checked: int, folder: Path | None, dump_error: str | None = None) -> WatchReport:
        """The run's report; `folder` None with `dump_error` when the dump could not be written."""
        return WatchReport(
            steps_checked=steps_checked, rank=self.rank, world_size=self.world_size, failed=True, step=self.step,
            reason=self.agreement.kind, origin_ranks=self.agreement.origin_ranks,
            nonfinite_terms=self.nonfinite_terms, loss_terms=self.terms, overflow_skips=self.overflow_skips,
            overflow_steps=self.overflow_steps, last_scale=self.last_scale, dump=folder,
            findings=(finding(self, folder),),
            exception=f"{self.exception['type']}: {self.exception['message']}" if self.exception else None,
            dump_error=dump_error,
        )


def scaler_state(scaler: Any) -> dict[str, Any] | None:
    """A GradScaler's state dict (or `get_scale()` of a look-alike) as JSON numbers; one host read."""
    if scaler is None:
        return None
    try:
        sd = dict(scaler.state_dict()) if hasattr(scaler, "state_dict") else {}
    except Exception:  # a GradScaler-like object without a usable state_dict
        sd = {}
    if "scale" not in sd and hasattr(scaler, "get_scale"):
        sd["scale"] = float(scaler.get_scale())
    return {str(k): floats(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            for k, v in sd.items() if isinstance(v, (int, float, str, bool))}


def manifest(bad: BadStep, *, model_class: str, stack: dict[str, Any], config: str | None, text_encoder: str | None,
             criterion: str | None, config_values: dict[str, Any] | None, scaler: dict[str, Any] | None, device: torch.device, steps_checked: int,
             notes: list[str]) -> dict[str, Any]:
    """DUMP/manifest.json: enough for `nanscope inspect DUMP` to rebuild, replay and explain the step."""
    ag, vals = bad.agreement, bad.values
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "step": bad.step, "rank": bad.rank, "world_size": bad.world_size,
        "origin": bad.rank in ag.origin_ranks, "origin_ranks": list(ag.origin_ranks), "reason": ag.kind,
        "local_first_bad_step": bad.local[0], "local_kind": bad.local[1],
        "per_rank": [[s, k] for s, k in ag.per_rank],
        "batch_step": bad.batch_step, "weights_step": bad.weights_step,
        "weights": "before the step (optimizer.step() not yet applied)" if bad.weights_step is not None else None,
        "loss_terms": {n: floats(v) for n, v in bad.terms.items()},
        "nonfinite_terms": list(bad.nonfinite_terms),
        "grad_norm": floats(vals["grad_norm"]) if "grad_norm" in vals else None,
        "config": config, "text_encoder": text_encoder, "criterion": criterion,
        "config_values": config_values,  # the config as JSON values: a replay builds from these, never runs `config`
        "scaler": scaler,
        "amp": {"overflow_skips": bad.overflow_skips, "overflow_steps": list(bad.overflow_steps),
                "scale_at_step": floats(vals["scale"]) if "scale" in vals else None,
                "min_scale": bad.min_scale, "max_consecutive_skips": bad.max_consecutive_skips,
                "autocast": dict(bad.forward.get("autocast", {}))},
        "model": {"class": model_class, "training": bad.forward.get("training")},
        "stack": dict(stack),  # the model family and what its replay needs (nanscope.stacks, dump_meta)
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps_checked": steps_checked,
        "exception": dict(bad.exception) if bad.exception else None,
        "notes": notes,
    }


def finding(bad: BadStep, folder: Path | None) -> Finding:
    """NS001 for a non-finite loss term or gradient norm, NS307 for a collapsing GradScaler scale, and for
    an exception raised before check(): NS203 when it is a matcher refusing non-finite costs, else NS001."""
    step, rank, kind, origin = bad.step, bad.rank, bad.agreement.kind, bad.agreement.origin_ranks
    data = {"dump": None if folder is None else str(folder), "loss_terms": bad.terms, "per_rank": [list(x) for x in bad.agreement.per_rank],
            "overflow_skips": bad.overflow_skips}
    if rank not in origin:
        ranks = ", ".join(str(r) for r in origin)
        return Finding("NS307" if kind == "scale_collapse" else "NS001", Severity.ERROR, count=1,
                       message=f"rank {ranks} went bad first ({kind}) at step {step}; this rank ({rank}) "
                               "was not the origin", where=tuple({"rank": r, "step": step} for r in origin),
                       data=data)
    if kind == "exception":
        from nanscope.replay.diagnose import MATCHING_FAILURES

        exc = dict(bad.exception or {})
        text = f"{exc.get('type', 'an exception')}: {exc.get('message', '')}"
        matching = any(s in text for s in MATCHING_FAILURES)
        return Finding("NS203" if matching else "NS001", Severity.ERROR, count=1,
                       message=f"step {step} on rank {rank} raised after the model's forward and before check(), "
                               f"so no loss terms exist for it: {text[:500]}",
                       where=({"rank": rank, "step": step},), data={**data, "exception": exc})
    if kind == "scale_collapse":
        scale = bad.values.get("scale", bad.last_scale)
        return Finding("NS307", Severity.ERROR, count=max(bad.consecutive_skips, 1),
                       message=f"GradScaler scale is {scale:g} at step {step} after {bad.consecutive_skips} "
                               f"overflow-skip(s) in a row ({bad.overflow_skips} in all); a collapse is a scale "
                               f"below {bad.min_scale:g} or {bad.max_consecutive_skips} skips in a row",
                       where=({"rank": rank, "step": step},), data=data)
    if kind == "nonfinite_grad":
        return Finding("NS001", Severity.ERROR, count=1,
                       message=f"gradient norm is {floats(bad.values.get('grad_norm', math.nan))} at step {step} "
                               f"on rank {rank} while every loss term is finite",
                       where=({"rank": rank, "step": step, "term": "grad_norm"},), data=data)
    shown = ", ".join(f"{n}={floats(bad.terms[n])}" for n in bad.nonfinite_terms)
    return Finding("NS001", Severity.ERROR, count=len(bad.nonfinite_terms),
                   message=f"{shown} at step {step} on rank {rank} (first non-finite step)",
                   where=tuple({"rank": rank, "step": step, "term": n} for n in bad.nonfinite_terms), data=data)
