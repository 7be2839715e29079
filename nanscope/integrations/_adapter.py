"""What every framework adapter shares: its settings, the attachment it makes, tracker alerts, and the end of a run.

No framework is imported here; each adapter module mixes `Adapter` into its framework's callback class.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from nanscope.integrations.trackers import alert_trackers
from nanscope.watch.attachment import AttachReport, Attachment, Policy, attach
from nanscope.watch.report import NonFiniteStepError, WatchReport


class Adapter:
    """Settings of `nanscope.watch.attach` kept until the framework says training begins."""

    def __init__(self, dump_dir: str | os.PathLike[str] = "nan-dumps", *, on_nonfinite: Policy = "stop",
                 max_skips: int = 10, raise_on_stop: bool = True, trackers: Any = "auto", **attach_kwargs: Any) -> None:
        self.dump_dir = dump_dir
        self.on_nonfinite = on_nonfinite
        self.max_skips = max_skips
        self.raise_on_stop = raise_on_stop  # raise NonFiniteStepError when training ends after a stop
        self.trackers = trackers
        self.attach_kwargs = attach_kwargs
        self.attachment: Attachment | None = None

    @property
    def report(self) -> AttachReport | None:
        """The run's `AttachReport` (None before training began)."""
        return None if self.attachment is None else self.attachment.report

    def _attach(self, obj: Any, model: Any, step: Callable[[], int],
                tracker_handles: Callable[[], Sequence[Any]], optimizer: Any = None) -> Attachment:
        """Attach without raising on stop (the framework is stopped by the adapter); alert the framework's trackers.
        `optimizer`: where the framework has no callback between backward and the step, its pre-hook drops a bad
        step's gradients."""
        self.attachment = attach(obj, self.dump_dir, model=model, step=step, on_nonfinite=self.on_nonfinite,
                                 max_skips=self.max_skips, raise_on_stop=False, trackers=self.trackers,
                                 optimizer=optimizer, **self.attach_kwargs)

        def alert(rep: WatchReport) -> None:
            handles = list(tracker_handles()) if self.trackers is not None else []
            problems = alert_trackers(rep, handles, nonfinite_steps=len(self.attachment.report.nonfinite_steps)) \
                if handles else []
            if problems:
                raise RuntimeError("; ".join(problems))

        self.attachment.add_listener(alert)
        return self.attachment

    def _drop_pending_step(self) -> None:
        if self.attachment is not None:
            self.attachment.drop_pending_step()  # a bad step's update is never applied

    def _finish(self) -> None:
        """Training ended: detach; after a stop, raise NonFiniteStepError (on every rank: they stopped together)."""
        if self.attachment is None:
            return
        rep = self.attachment.detach()
        if rep.stopped and self.raise_on_stop and rep.reports:
            raise NonFiniteStepError(rep.reports[-1])
