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

import sys
from typing import Any

from transformers import TrainerCallback

from nanscope.integrations._adapter import Adapter


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


class NanscopeCallback(Adapter, TrainerCallback):
    """Check every training forward's loss terms; dump, log and stop (or skip) at a non-finite step.

    Arguments: `nanscope.integrations._adapter.Adapter` (dump_dir, on_nonfinite, max_skips, raise_on_stop,
    trackers, and `nanscope.watch.attach`'s keywords).
    """

    _handler: Any = None
    _logged = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._handler = _caller_handler(self)
        if self._handler is not None:  # first: the report_to loggers then see what on_log adds
            self._handler.callbacks.remove(self)
            self._handler.callbacks.insert(0, self)
        self._attach(model, model, lambda: state.global_step, self._tensorboard_writers)

    def _tensorboard_writers(self) -> list[Any]:
        return [cb.tb_writer for cb in getattr(self._handler, "callbacks", [])
                if getattr(cb, "tb_writer", None) is not None]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._drop_pending_step()

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
        self._finish()
