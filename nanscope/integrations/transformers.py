"""`NanscopeCallback` for transformers' `Trainer`: the sentinel inside `training_step`, where no callback looks.

    from nanscope.integrations.transformers import NanscopeCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[NanscopeCallback("nan-dumps")])
    trainer.train()   # a NaN step: dump, `nanscope/nonfinite_steps` in the logs, NonFiniteStepError at the end

At `on_train_begin` it attaches (`nanscope.watch.attach`) to the model the Trainer calls with `labels`:
its `loss_dict` is checked when the forward returns, before backward, with `state.global_step` as the
step. A bad step's gradients are dropped in `on_pre_optimizer_step` (its update is never applied);
"stop" then ends training through `control.should_training_stop` on every rank and raises
`NonFiniteStepError` from `on_train_end`; "skip" goes on. The callback moves itself first in the
Trainer's callback list, so the `report_to` loggers log `nanscope/nonfinite_steps` with the loss
(which `logging_nan_inf_filter` would otherwise smooth over), and the verdict goes to the W&B and
MLflow runs and to the TensorBoard writer of the Trainer's own callbacks.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from transformers import TrainerCallback

from nanscope.integrations.trackers import alert_trackers
from nanscope.watch.attachment import Attachment, Policy, attach
from nanscope.watch.report import NonFiniteStepError, WatchReport


def _caller_handler(me: Any) -> Any:
    """The Trainer's CallbackHandler that is calling `me` (callbacks are not given it), or None."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(getattr(owner, "callbacks", None), list) and me in owner.callbacks:
            return owner
        frame = frame.f_back
    return None


class NanscopeCallback(TrainerCallback):
    """Check every training forward's loss terms; dump, log and stop (or skip) at a non-finite step."""

    def __init__(self, dump_dir: str | os.PathLike[str] = "nan-dumps", *, on_nonfinite: Policy = "stop",
                 max_skips: int = 10, raise_on_stop: bool = True, trackers: Any = "auto", **attach_kwargs: Any) -> None:
        self.dump_dir = dump_dir
        self.on_nonfinite = on_nonfinite
        self.max_skips = max_skips
        self.raise_on_stop = raise_on_stop
        self.trackers = trackers
        self.attach_kwargs = attach_kwargs
        self.attachment: Attachment | None = None
        self._handler: Any = None
        self._logged = 0

    @property
    def report(self) -> Any:
        """The run's `AttachReport` (None before training began)."""
        return None if self.attachment is None else self.attachment.report

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._handler = _caller_handler(self)
        if self._handler is not None:  # first: the report_to loggers then see what on_log adds
            self._handler.callbacks.remove(self)
            self._handler.callbacks.insert(0, self)
        self.attachment = attach(model, self.dump_dir, step=lambda: state.global_step, on_nonfinite=self.on_nonfinite,
                                 max_skips=self.max_skips, raise_on_stop=False, trackers=self.trackers,
                                 **self.attach_kwargs)
        self.attachment.add_listener(self._alert_tensorboard)

    def _alert_tensorboard(self, rep: WatchReport) -> None:
        writers = [cb.tb_writer for cb in getattr(self._handler, "callbacks", [])
                   if getattr(cb, "tb_writer", None) is not None]
        problems = alert_trackers(rep, writers, nonfinite_steps=len(self.report.nonfinite_steps)) if writers else []
        if problems:
            raise RuntimeError("; ".join(problems))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.attachment is not None:
            self.attachment.drop_pending_step()  # a bad step's update is never applied

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.attachment is None:
            return None
        if len(self.attachment.report.nonfinite_steps) > self._logged:
            control.should_log = True  # the bad step shows in the logs now, not at the next logging_steps
        if self.attachment.stopped:
            control.should_training_stop = True
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.attachment is None or logs is None:
            return
        rep = self.attachment.report
        logs["nanscope/nonfinite_steps"] = len(rep.nonfinite_steps)
        if rep.skipped_steps:
            logs["nanscope/skipped_steps"] = len(rep.skipped_steps)
        self._logged = len(rep.nonfinite_steps)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.attachment is None:
            return
        rep = self.attachment.detach()
        if rep.stopped and self.raise_on_stop and rep.reports:
            raise NonFiniteStepError(rep.reports[-1])
