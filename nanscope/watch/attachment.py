"""`nanscope.watch.attach`: the sentinel where the loss terms are returned, for loops nanscope does not own.

    with nanscope.watch.attach(model, "nan-dumps", optimizer=optimizer):   # transformers' model called with labels
        trainer_or_loop.run()                                              # MMDetection's model in mode='loss'
    with nanscope.watch.attach(criterion, "nan-dumps", model=model):       # a criterion module; a plain function:
        ...                                                                # use the returned object in its place

A forward hook on the object reads its output's loss terms (`nanscope.watch.loss_terms`) when the
forward returns, before any backward, and hands them to the same `Watcher` as `watch()` (its reads,
dumps, weight copy and rank agreement), with the batch taken from the call (the model's inputs, and
the criterion's targets). The step number is a counter of checked forwards, or `step()` (a trainer's
global step, so gradient accumulation's micro-batches share one step). Only forwards of a model in
training mode are checked.

A bad step, by `on_nonfinite`:
  "stop"               raise `NonFiniteStepError` from the forward (before backward), on every rank;
                       adapters pass `raise_on_stop=False` and stop their framework themselves
  "skip"               drop the step: every parameter's gradient is set to None just before the next
                       optimizer step (torch optimizers then leave each parameter as it is, as a GradScaler
                       skip does); every rank skips the same step (the ranks agree at every check)
  "dump-and-continue"  dump it and go on
After `max_skips` bad steps the next one stops the run. Each bad step is dumped (a `step{N}-rank{R}/`
folder) and its verdict goes to the listeners and the active trackers (`nanscope.integrations.trackers`).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import nn

from nanscope.errors import InputError
from nanscope.watch.loss_terms import loss_terms
from nanscope.watch.report import NonFiniteStepError, WatchReport
from nanscope.watch.sentinel import Watcher, WatchOptions

Policy = Literal["stop", "skip", "dump-and-continue"]
POLICIES = ("stop", "skip", "dump-and-continue")
Listener = Callable[[WatchReport], None]


@dataclass(frozen=True)
class AttachReport:
    """The run as the attachment saw it: every bad step, what was skipped, whether it stopped."""

    steps_checked: int
    nonfinite_steps: tuple[int, ...] = ()
    skipped_steps: tuple[int, ...] = ()
    stopped: bool = False
    reports: tuple[WatchReport, ...] = field(default_factory=tuple)  # one per bad step, in order

    @property
    def first(self) -> WatchReport | None:
        return self.reports[0] if self.reports else None

    @property
    def verdict(self) -> str | None:
        """The first bad step's finding, one line (None for a healthy run)."""
        first = self.first
        if first is None:
            return None
        return first.findings[0].message if first.findings else f"step {first.step} went bad"

    def to_dict(self) -> dict[str, Any]:
        return {"steps_checked": self.steps_checked, "nonfinite_steps": list(self.nonfinite_steps),
                "skipped_steps": list(self.skipped_steps), "stopped": self.stopped, "verdict": self.verdict,
                "dumps": [None if r.dump is None else str(r.dump) for r in self.reports],
                "reports": [r.to_dict() for r in self.reports]}


class Attachment:
    """Hooks on the object (and model) that check each returned loss; `detach()` (or `with`) removes them all."""

    def __init__(self, obj: Any, dump_dir: str | os.PathLike[str], *, model: nn.Module | None = None,
                 optimizer: Any = None, on_nonfinite: Policy = "stop", max_skips: int = 10,
                 step: Callable[[], int] | None = None, batch: Callable[[tuple, dict], Any] | None = None,
                 raise_on_stop: bool = True, trackers: Sequence[Any] | Literal["auto"] | None = "auto",
                 listeners: Sequence[Listener] = (), **watch_kwargs: Any) -> None:
        if on_nonfinite not in POLICIES:
            raise InputError(f"on_nonfinite={on_nonfinite!r}; expected one of {', '.join(map(repr, POLICIES))}")
        if not isinstance(max_skips, int) or max_skips < 0:
            raise InputError(f"max_skips={max_skips!r}; expected a number of bad steps >= 0")
        if not callable(obj):
            raise InputError(f"attach() got a {type(obj).__name__}, which cannot be called; expected a criterion "
                             "(an nn.Module or a function returning loss terms) or a model that returns its loss")
        if model is None and not isinstance(obj, nn.Module):
            raise InputError(f"attach() to the function {getattr(obj, '__qualname__', obj)!r} needs model=: the "
                             "nn.Module being trained, whose weights and inputs a dump holds")
        opt = _torch_optimizer(optimizer)  # checked before any hook is placed
        if opt is None and on_nonfinite == "skip" and raise_on_stop:
            raise InputError("on_nonfinite='skip' needs optimizer=: the skip drops the gradients right before "
                             "optimizer.step() (the framework adapters do this themselves)")
        self.obj = obj
        self.model: nn.Module = model if model is not None else obj
        if not isinstance(self.model, nn.Module):
            raise InputError(f"model= is a {type(self.model).__name__}; expected the torch.nn.Module being trained")
        self.policy = on_nonfinite
        self.max_skips = max_skips
        self.raise_on_stop = raise_on_stop
        self._step_fn = step
        self._batch_fn = batch
        self._trackers = trackers
        self._listeners = list(listeners)
        if on_nonfinite == "skip":
            watch_kwargs["sync_every"] = 1  # the skip is decided at the step itself, on every rank
        self._dump_dir = dump_dir
        self._watch_kwargs = watch_kwargs
        self._watcher = self._new_watcher()
        self._count = 0
        self._checked_before = 0  # checks of watchers already replaced after a bad step
        self._reports: list[WatchReport] = []
        self._skipped: list[int] = []
        self._stopped = False
        self._pending_drop = False
        self._model_call: tuple[tuple, dict] | None = None
        self._detached = False
        self._handles: list[Any] = []
        if isinstance(obj, nn.Module):
            # always_call: also when the forward raises (a matcher refusing NaN costs): that step is dumped
            self._handles.append(obj.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True))
        if obj is not self.model:  # a criterion: the model's inputs give the dump its images and captions
            self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        if opt is not None:
            self._handles.append(opt.register_step_pre_hook(self._before_optimizer_step))

    def _new_watcher(self) -> Watcher:
        kw = dict(self._watch_kwargs)
        fields = {k: kw.pop(k) for k in list(kw) if k in WatchOptions.__dataclass_fields__}
        opts = WatchOptions(**{**fields, "on_nonfinite": "stop"})
        if "criterion" not in kw and self.obj is not self.model:
            kw["criterion"] = self.obj  # recorded as 'module:QualName' for the replay
        return Watcher(self.model, self._dump_dir, options=opts, **kw)

    # ------------------------------------------------------------ state

    @property
    def stopped(self) -> bool:
        """A bad step ended the run (the framework should stop; the plain API raised already)."""
        return self._stopped

    @property
    def report(self) -> AttachReport:
        return AttachReport(steps_checked=self._checked_before + self._watcher.report.steps_checked,
                            nonfinite_steps=tuple(r.step for r in self._reports if r.step is not None),
                            skipped_steps=tuple(self._skipped), stopped=self._stopped, reports=tuple(self._reports))

    def add_listener(self, listener: Listener) -> None:
        """`listener(report)` is called for each bad step, after its dump is written (errors become warnings)."""
        self._listeners.append(listener)

    def drop_pending_step(self) -> bool:
        """Before the optimizer step: after a skipped (or stopping) step, set every gradient to None. True if so."""
        if not self._pending_drop:
            return False
        self._pending_drop = False
        for p in self.model.parameters():
            p.grad = None
        return True

    # ------------------------------------------------------------ hooks

    def _before_optimizer_step(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        self.drop_pending_step()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """For a plain function criterion: call it through the attachment."""
        if isinstance(self.obj, nn.Module):
            return self.obj(*args, **kwargs)  # the forward hook checks it
        try:
            out = self.obj(*args, **kwargs)
        except Exception as exc:
            if not (self._detached or self._stopped) and self.model.training:
                self._raised(exc)
            raise
        checked = self._post_forward(None, args, kwargs, out)
        return out if checked is None else checked

    def _model_pre(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        self._model_call = (args, kwargs)

    def _post_forward(self, _m: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self._detached or self._stopped or not self.model.training:
            return None
        raised = sys.exc_info()[1]
        if output is None and isinstance(raised, Exception):
            self._raised(raised)
            return None
        terms = loss_terms(output, where=f"{type(self.obj).__name__}'s forward")
        if terms is None:
            return None
        step = int(self._step_fn()) if self._step_fn is not None else self._count
        self._count += 1
        batch = self._batch_fn(args, kwargs) if self._batch_fn is not None else self._criterion_batch(args, kwargs)
        if self._watcher.check(step, terms, batch):
            return None
        self._bad(self._watcher.report)
        return None

    def _criterion_batch(self, args: tuple, kwargs: dict) -> Any:
        """The criterion's targets with the model call's images and captions (None: the watcher reads the model call)."""
        if self.obj is self.model or self._model_call is None:
            return None
        margs, mkw = self._model_call
        images = margs[0] if margs else mkw.get("images", mkw.get("samples"))
        if images is None or "pixel_values" in mkw:
            return None
        batch: dict[str, Any] = {"images": images}
        captions = mkw.get("captions")
        if captions is None and len(margs) > 1 and isinstance(margs[1], (list, tuple)):
            captions = margs[1]
        if captions is not None:
            batch["captions"] = list(captions)
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        if isinstance(targets, (list, tuple)) and all(isinstance(t, Mapping) for t in targets):
            batch["targets"] = list(targets)
        return batch

    # ------------------------------------------------------------ a bad step

    def _bad(self, rep: WatchReport) -> None:
        self._reports.append(rep)
        self._announce(rep)
        over = len(self._reports) > self.max_skips
        if self.policy == "stop" or over:
            self._stopped = True
            self._pending_drop = True  # an adapter that stops after this step: its update is not applied
            if self.raise_on_stop:
                self.detach()
                raise NonFiniteStepError(rep) if not over else _too_many(rep, self.max_skips)
            return
        if self.policy == "skip":
            self._skipped.append(int(rep.step))  # type: ignore[arg-type]
            self._pending_drop = True
        self._checked_before += self._watcher.report.steps_checked
        self._watcher.close()
        self._watcher = self._new_watcher()  # the same engine, armed again for the next bad step

    def _raised(self, exc: Exception) -> None:
        """The forward raised: dump the step as watch() does when its block raises; the run stops."""
        if isinstance(exc, NonFiniteStepError):
            return
        self._stopped = True
        self._watcher.__exit__(type(exc), exc, exc.__traceback__)  # dumps, warns where, never raises
        rep = self._watcher.report
        if rep.failed:
            self._reports.append(rep)
            self._announce(rep)

    def _announce(self, rep: WatchReport) -> None:
        from nanscope.integrations.trackers import alert_trackers

        problems: list[str] = []
        if self._trackers is not None:
            problems += alert_trackers(rep, self._trackers, nonfinite_steps=len(self._reports))
        for listener in self._listeners:
            try:
                listener(rep)
            except Exception as exc:  # noqa: BLE001 (a listener never hides the NaN)
                problems.append(f"{getattr(listener, '__qualname__', listener)}: {type(exc).__name__}: {exc}")
        if problems:
            warnings.warn(f"nanscope: step {rep.step} went bad (dump: {rep.dump}); reporting it failed: "
                          + "; ".join(p[:300] for p in problems), RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------ teardown

    def detach(self) -> AttachReport:
        """Remove every hook; read what is pending (under torch.distributed every rank must call it)."""
        if self._detached:
            return self.report
        self._detached = True
        for h in self._handles:
            h.remove()
        self._handles = []
        before = self._watcher.report.failed
        self._watcher.close()
        rep = self._watcher.report
        if rep.failed and not before:  # the last steps, read only now (sync_every > 1)
            self._reports.append(rep)
            self._announce(rep)
            if self.policy == "stop" or len(self._reports) > self.max_skips:
                self._stopped = True
                if self.raise_on_stop:
                    raise NonFiniteStepError(rep)
        return self.report

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        if exc_type is None:
            self.detach()
            return False
        if not self._detached:
            self._detached = True
            for h in self._handles:
                h.remove()
            self._handles = []
            self._watcher.__exit__(exc_type, exc, tb)  # dumps the step the exception came from, as watch() does
        return False


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer itself, also inside Accelerate's, Lightning's and MMEngine's wrappers (`.optimizer`)."""
    if optimizer is None:
        return None
    inner = getattr(optimizer, "optimizer", None)
    opt = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise InputError(f"optimizer= is a {type(optimizer).__name__}; expected a torch.optim.Optimizer (or a wrapper "
                         "holding one as .optimizer)")
    return opt


def _too_many(rep: WatchReport, max_skips: int) -> NonFiniteStepError:
    err = NonFiniteStepError(rep)
    err.args = (f"more than max_skips={max_skips} bad steps; the last: {err.args[0]}",)
    return err


def attach(obj: Any, dump_dir: str | os.PathLike[str] = "nan-dumps", *, model: nn.Module | None = None,
           optimizer: Any = None, on_nonfinite: Policy = "stop", max_skips: int = 10,
           step: Callable[[], int] | None = None, batch: Callable[[tuple, dict], Any] | None = None,
           trackers: Sequence[Any] | Literal["auto"] | None = "auto", raise_on_stop: bool = True,
           **watch_kwargs: Any) -> Attachment:
    """Check the loss terms `obj` returns at every training forward; dump the first bad step as `watch()` does.

    Args:
        obj: a criterion (nn.Module or function) or a model whose output carries its loss terms
            (transformers' GroundingDino called with labels: `loss_dict`; MMDetection's `mode='loss'` dict).
        dump_dir: where `step{N:08d}-rank{R}/` dumps go (`nanscope inspect DUMP` replays one).
        model: the trained module (default: `obj`); required when `obj` is a criterion.
        optimizer: its step drops a skipped step's gradients (needed for on_nonfinite="skip").
        on_nonfinite, max_skips: the policy (module docstring).
        step: returns the current step number (default: count the checked forwards).
        batch: `batch(args, kwargs)` of the obj's call -> the step's batch in nanscope's schema.
        trackers: "auto" (W&B / MLflow runs that are active), a list of tracker handles, or None.
        raise_on_stop: False for adapters that stop their framework themselves (see `Attachment.stopped`).
        watch_kwargs: `watch()`'s options (criterion, scaler, config, text_encoder, process_group,
            sync_every, keep_weights, min_scale, max_consecutive_skips).
    """
    return Attachment(obj, dump_dir, model=model, optimizer=optimizer, on_nonfinite=on_nonfinite,
                      max_skips=max_skips, step=step, batch=batch, trackers=trackers,
                      raise_on_stop=raise_on_stop, **watch_kwargs)

