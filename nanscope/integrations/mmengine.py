"""`NanscopeHook` for MMEngine (MMDetection's MM-GroundingDINO, LLMDet), registered in MMEngine's HOOKS registry.

    import nanscope.integrations.mmengine  # noqa: F401 (registers the hook; or custom_imports in the config)
    custom_hooks = [dict(type="NanscopeHook", dump_dir="nan-dumps", on_nonfinite="stop")]

`BaseModel.train_step` runs forward(mode='loss'), `parse_losses`, backward and the optimizer step in
one call before any hook, and `CheckInvalidLossHook` looks every 50 iterations, after the update. So
at `before_train` the hook attaches (`nanscope.watch.attach`) to the runner's model (`.module` under
DDP): its loss dict is checked when forward(mode='loss') returns, with `runner.iter` as the step; the
detector found inside (a transformers or groundingdino-py model) is what a dump holds. A bad step's
gradients are dropped by a pre-hook on the optimizer; "stop" ends the loop (`train_loop.stop_training`)
and raises `NonFiniteStepError` from `after_train`; `train/nanscope_nonfinite_steps` goes to the message
hub (the LoggerHook and visualizer backends log it) and the verdict to the TensorBoard backend's writer.
"""

from __future__ import annotations

import os
from typing import Any

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from nanscope.integrations._adapter import Adapter
from nanscope.watch.snapshot import model_stack


@HOOKS.register_module(force=True)  # force: re-importing this module (reloads, tests) re-registers it
class NanscopeHook(Adapter, Hook):
    """Check forward(mode='loss') of the runner's model at every iteration; dump, log and stop (or skip).

    Arguments: `nanscope.integrations._adapter.Adapter` (dump_dir, on_nonfinite, max_skips, raise_on_stop,
    trackers, and `nanscope.watch.attach`'s keywords).
    """

    priority = "VERY_HIGH"

    def __init__(self, dump_dir: str | os.PathLike[str] = "nan-dumps", **settings: Any) -> None:
        super().__init__(str(dump_dir), **settings)

    def before_train(self, runner: Any) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        stack = model_stack(model)
        detector = stack.find_model(model) if stack is not None else model
        self._attach(model, detector, lambda: runner.iter, lambda: _tensorboard_writers(runner),
                     optimizer=runner.optim_wrapper)

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if self.attachment is None:
            return
        runner.message_hub.update_scalar("train/nanscope_nonfinite_steps",
                                         float(len(self.attachment.report.nonfinite_steps)))
        if self.attachment.stopped:
            runner.train_loop.stop_training = True

    def after_train(self, runner: Any) -> None:
        self._finish()


def _tensorboard_writers(runner: Any) -> list[Any]:
    backends = getattr(getattr(runner, "visualizer", None), "_vis_backends", {}) or {}
    writers = [getattr(b, "experiment", None) for b in backends.values()]
    return [w for w in writers if hasattr(w, "add_text")]
