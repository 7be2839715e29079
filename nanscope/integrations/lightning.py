"""`NanscopeCallback` for Lightning: the sentinel on the criterion (or the loss-computing model) a LightningModule holds.

    from nanscope.integrations.lightning import NanscopeCallback
    trainer = lightning.Trainer(callbacks=[NanscopeCallback("nan-dumps", attach_to="criterion")])
    trainer.fit(module)   # a NaN step: dump, `nanscope/nonfinite_steps` logged, NonFiniteStepError at the end

Lightning hands callbacks the scalar loss only (`on_before_backward`) and runs `on_train_batch_end`
after the optimizer step, so at `on_train_start` the callback attaches (`nanscope.watch.attach`) to
`module.<attach_to>` (a criterion, or a model that returns its loss terms: transformers' GroundingDino
with labels) and dumps `module.<model>`'s weights, with `trainer.global_step` as the step. A bad step's
gradients are dropped in `on_before_optimizer_step` (after the closure's backward, before the update);
"stop" sets `trainer.should_stop`; the verdict goes to the trainer's loggers (TensorBoard, MLflow, W&B).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import Callback

from nanscope.errors import InputError
from nanscope.integrations._adapter import Adapter


def _attribute(module: Any, path: str, role: str) -> Any:
    obj = module
    for part in path.split("."):
        if not hasattr(obj, part):
            children = ", ".join(n for n, _ in module.named_children()) or "none"
            raise InputError(f"NanscopeCallback({role}={path!r}): {type(module).__name__} has no attribute {path!r} "
                             f"(its child modules: {children}); expected the attribute holding the {role}")
        obj = getattr(obj, part)
    return obj


class NanscopeCallback(Adapter, Callback):
    """Check every training forward of `module.<attach_to>`; dump, log and stop (or skip) at a non-finite step.

    attach_to: the attribute path of the criterion (or loss-computing model); model: the trained model's
    (None: the LightningModule itself). Other arguments: `nanscope.integrations._adapter.Adapter`.
    """

    def __init__(self, dump_dir: str | os.PathLike[str] = "nan-dumps", *, attach_to: str = "criterion",
                 model: str | None = "model", **settings: Any) -> None:
        super().__init__(dump_dir, **settings)
        self.attach_to = attach_to
        self.model_attr = model

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        obj = _attribute(pl_module, self.attach_to, "attach_to")
        model = pl_module if self.model_attr is None else _attribute(pl_module, self.model_attr, "model")
        self._attach(obj, model, lambda: trainer.global_step, lambda: _tracker_handles(trainer.loggers))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._drop_pending_step()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.attachment is None:
            return
        rep = self.attachment.report
        pl_module.log("nanscope/nonfinite_steps", float(len(rep.nonfinite_steps)), on_step=True, on_epoch=False)
        if self.attachment.stopped:
            trainer.should_stop = True

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.attachment is not None:
            self.attachment.__exit__(type(exception), exception, exception.__traceback__)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish()


def _tracker_handles(loggers: list[Any]) -> list[Any]:
    """TensorBoardLogger's SummaryWriter, MLFlowLogger itself (client + run_id); W&B's run is found as active."""
    handles = []
    for lg in loggers:
        exp = getattr(lg, "experiment", None)
        if hasattr(exp, "add_text"):
            handles.append(exp)
        elif getattr(lg, "run_id", None) is not None and hasattr(exp, "set_tag"):
            handles.append(lg)
    return handles
