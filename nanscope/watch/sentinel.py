"""`nanscope.watch`: a NaN sentinel cheap enough to leave on in training.

    with nanscope.watch(model, dump_dir="nan-dumps", scaler=scaler) as watcher:
        for step, batch in enumerate(loader):
            loss_dict = criterion(model(batch["images"], captions=batch["captions"]), targets)
            watcher.check(step, loss_dict, batch)      # before optimizer.step()
            ...backward, optimizer step...

`check` stacks the loss terms (and optionally the gradient norm and the GradScaler scale) into one
small vector. On the CPU it is read at once. On CUDA it is copied into pinned host memory behind a
CUDA event and read when the event has completed (the loop's own `.item()` or any other sync makes
that happen), or at the latest every `sync_every` checks: the sentinel never waits on the device
itself in between. Because the read can come a few steps late, a device copy of the weights is
kept and frozen at the first bad step (`torch.where`, no host read), so the dump still holds the
weights as they were before that step. Under torch.distributed the ranks agree at the read points
with one small `all_gather` (see `nanscope.watch.ranks`) and all stop at the same check.

A step can also fail before check(): a NaN image makes every cost NaN and the Hungarian matcher
raises inside the criterion. When the `with` block raises an `Exception` after the model ran for
a step, the watcher dumps that step (number: last checked step + 1; the live weights, which are
from before it as optimizer.step() comes after check(); images and captions from the model call;
`reason: "exception"` with the exception's type and message), warns where the dump is, and lets
the exception propagate unchanged. An earlier bad step still unread wins over it. No dump for
KeyboardInterrupt/SystemExit, for NonFiniteStepError (dumped already), after a failure, or when
the model did not run since the last check (a data loader error between steps).

Wrappers that call the detector with other argument names (`wrapper(images, class_names=[...])`
building the captions and calling the inner GroundingDINO with `captions=`): a second pre-hook on
the detector the model's stack finds inside (`stack.find_model`) records the captions where the
detector receives them. At the first check() the watcher warns once when a dump of the step could
not be replayed (`nanscope.watch.dump_targets.replay_gaps`: no captions, boxes without phrases,
spans or a positive map, ...), reading only keys and shapes.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import Tensor, nn

from nanscope.errors import InputError
from nanscope.watch.amp import ScaleTracker, scale_value
from nanscope.watch.dump_targets import replay_gaps
from nanscope.watch.dumping import DumpWriter, check_dump_dir, criterion_spec, stack_meta
from nanscope.watch.ranks import Agreement, RankContext, agree, rank_context
from nanscope.watch.records import StepRecord, syncs_allowed
from nanscope.watch.sharding import sharding
from nanscope.watch.report import NonFiniteStepError, WatchReport
from nanscope.watch.snapshot import WeightSnapshot, capture_rng, model_stack

OnNonFinite = Literal["raise", "stop"]
MAX_SYNC_EVERY = 1024  # a larger sync_every is capped: the unread steps' batches are kept alive until read


@dataclass(frozen=True)
class WatchOptions:
    # Read the flags (and agree across ranks) at least every N checks. None: 1 on the CPU, where a
    # read costs nothing, and 50 on CUDA, where it is a device sync (one per 50 steps is noise);
    # 1 under FSDP, whose full weights can only be gathered at the bad step's own check.
    sync_every: int | None = None
    # Keep a device copy of the weights, frozen at the first bad step (one extra copy of the model
    # in device memory). None: on when a read can come after optimizer.step(), i.e. sync_every > 1
    # (never under FSDP: a copy would hold this rank's shards only).
    keep_weights: bool | None = None
    # A GradScaler scale below this is a collapse (NS307): with a scale under 1 the fp16 gradients
    # overflow even unscaled, and torch's own default starts at 2**16.
    min_scale: float = 1.0
    # This many overflow-skips in a row is a collapse too: the scale fell 2**10-fold (backoff 0.5);
    # a healthy fp16 warm-up from 2**16 settles after a handful of skips.
    max_consecutive_skips: int = 10
    on_nonfinite: OnNonFinite = "raise"  # "raise": check() raises NonFiniteStepError; "stop": it returns False


class Watcher(DumpWriter):
    """The sentinel. Build it with `nanscope.watch(...)`; use `check` once per step, `close` (or `with`) at the end."""

    def __init__(self, model: nn.Module, dump_dir: str | os.PathLike[str], *, options: WatchOptions,
                 criterion: Any = None, scaler: Any = None, config: str | os.PathLike[str] | None = None,
                 text_encoder: str | os.PathLike[str] | None = None, process_group: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"watch() got a {type(model).__name__}; expected the torch.nn.Module being trained")
        if options.on_nonfinite not in ("raise", "stop"):
            raise InputError(f"on_nonfinite={options.on_nonfinite!r}; expected 'raise' or 'stop'")
        if options.sync_every is not None and options.sync_every < 1:
            raise InputError(f"sync_every={options.sync_every}; expected a positive number of steps or None")
        self.model = model
        self.dump_dir = Path(dump_dir)
        check_dump_dir(self.dump_dir)
        self.options = options
        self.scaler = scaler
        self.criterion_spec = criterion_spec(criterion)
        self.config = None if config is None else str(Path(config).resolve())
        self.config_values = None if config is None else recorded_config(config)
        self.stack_meta = stack_meta(model)
        self.text_encoder = str(text_encoder) if text_encoder is not None else self.stack_meta.get("text_encoder")
        if text_encoder is not None and Path(text_encoder).is_dir():
            self.text_encoder = str(Path(text_encoder).resolve())
        self.ctx: RankContext = rank_context(process_group)
        self._sharding = sharding(model)  # "fsdp2" / "fsdp1": the dump gathers the full weights (a collective)
        if self._sharding is not None and options.keep_weights:
            raise InputError(f"keep_weights=True with a model sharded by {self._sharding.upper()}: a weight copy "
                             "would hold this rank's shards only; leave keep_weights unset (under FSDP the full "
                             "weights are gathered at the check of the bad step)")
        self._records: list[StepRecord] = []  # since the last read point, in step order
        self._unread = 0  # index into _records of the first record not analyzed yet
        self._checks = 0
        self._last_step: int | None = None  # the step of the latest check()
        self._since_sync = 0
        self._local: tuple[int, str] | None = None  # (first bad step, kind) seen on this rank
        self._sticky_step: int | None = None  # the step the weight snapshot froze at
        self._sticky: Tensor | None = None  # device flag: a bad step was seen (freezes the snapshot)
        self._snapshot: WeightSnapshot | None = None
        self._device: torch.device | None = None
        self._ring: Tensor | None = None  # pinned host slots for the CUDA reads
        self._forward: dict[str, Any] | None = None
        self._amp = ScaleTracker(options.min_scale, options.max_consecutive_skips)
        self._report: WatchReport | None = None
        self._closed = False
        self._replay_checked = False  # the one-time "this dump could not be replayed" check has run
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._stack = model_stack(model)
        self._inner_hook = None
        if self._stack is not None:  # where the detector itself receives the captions, inside any wrapper
            self._inner_hook = self._stack.find_model(model).register_forward_pre_hook(self._inner_forward,
                                                                                      with_kwargs=True)

    # ------------------------------------------------------------ the loop API

    def check(self, step: int, loss_dict: Mapping[str, Tensor | float] | Tensor, batch: Any = None,
              *, grad_norm: Tensor | float | bool | None = None) -> bool:
        """Record step `step`; return True while the run is healthy as far as read so far.

        Call it after the loss and before `optimizer.step()` (before or after backward). `loss_dict`
        maps term names to 0-dim tensors (or one tensor, named "loss"); `batch` is the step's input in
        nanscope's schema or a DETR-style (samples, targets) pair, only referenced until it is read
        (extra keys are dropped from the dump). `grad_norm`: a tensor such as
        `clip_grad_norm_`'s result, or True to compute the norm of the current gradients here.
        With a GradScaler a non-finite gradient norm is an overflow-skip, not a failure.
        """
        if self._closed:
            raise InputError("check() was called on a closed watcher; create a new one with nanscope.watch(...)")
        if self._report is not None and self._report.failed:
            return self._stop()
        fwd, self._forward = self._forward, None  # taken first: a check() that raises leaves no forward to dump
        if not self._replay_checked and self._stack is not None:  # only a detector's dump can be replayed
            self._replay_checked = True
            self._warn_unreplayable(batch, fwd)
        names, dev, host = self._collect(loss_dict, grad_norm)
        if fwd is not None and batch is not None:  # the batch is given: do not keep the model inputs alive too
            fwd = {k: v for k, v in fwd.items() if k not in ("args", "kwargs")}
        n_fail = sum(1 for n in names if n not in ("grad_norm", "scale"))
        n_fail += 1 if "grad_norm" in names and not self._scaler_on() else 0
        rec = StepRecord(step=int(step), names=tuple(names), n_fail=n_fail, host=host, batch=batch, forward=fwd,
                      rng_at_check=capture_rng())
        self._enqueue(rec, dev)
        self._checks += 1
        self._last_step = rec.step
        self._since_sync += 1
        due = self._since_sync >= self._sync_every()
        if self.ctx.distributed:
            self._drain(block=False)
            if due:
                return self._agree(current=rec.step)
            return True
        self._drain(block=due)
        if due:
            self._read_point()
        if self._local is not None:
            return self._decide(Agreement(((self._local[0], self._local[1]),)), current=rec.step)
        return True

    def poll(self) -> bool:
        """Read every pending flag now (a device sync); under torch.distributed, all ranks must call it together.

        Call it where the loop synchronizes anyway, e.g. right after logging `loss.item()`.
        """
        if self._report is not None and self._report.failed:
            return self._stop()
        if not self._records:
            return True
        if self.ctx.distributed:
            return self._agree(current=None)
        self._drain(block=True)
        self._read_point()
        if self._local is not None:
            return self._decide(Agreement(((self._local[0], self._local[1]),)), current=None)
        return True

    @property
    def weight_copy_bytes(self) -> int:
        """Device memory held by the weight copy that covers late reads (0 when keep_weights is off)."""
        return 0 if self._snapshot is None else self._snapshot.nbytes

    @property
    def report(self) -> WatchReport:
        """The report so far (final after a failure or `close`)."""
        return self._report or self._healthy_report()

    def close(self) -> WatchReport:
        """Read what is pending, remove the hook and buffers, and return the report.

        Under torch.distributed every rank must call it (one last agreement). If the last steps went
        bad, the dump is written and, with on_nonfinite="raise", NonFiniteStepError is raised.
        """
        if self._closed:
            return self.report
        try:
            self._sample_final_scale()
            if self._report is None and self._records:
                if self.ctx.distributed:
                    self._agree(current=None)
                else:
                    self._drain(block=True)
                    if self._local is not None:
                        self._decide(Agreement(((self._local[0], self._local[1]),)), current=None)
        finally:
            self._teardown()
        return self.report

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        if exc_type is None:
            self.close()
            return False
        try:  # never a collective here: another rank may not be coming
            if self._dumps_for(exc):
                self._dump_exception(exc)
        finally:
            self._teardown()
        return False  # the exception propagates unchanged

    # ------------------------------------------------------------ collection

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._forward is not None:
            return None
        autocast = {}
        for dt in ("cpu", "cuda"):
            if torch.is_autocast_enabled(dt):
                autocast[dt] = str(torch.get_autocast_dtype(dt)).replace("torch.", "")
        self._forward = {"rng": capture_rng(), "autocast": autocast, "training": bool(module.training),
                         "args": args, "kwargs": kwargs}
        return None

    def _inner_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The detector's own call: keep its captions (strings only; no tensor is kept alive)."""
        if self._forward is not None and "captions" not in self._forward and self._stack is not None:
            captions = self._stack.call_captions(args, kwargs)
            if captions is not None:
                self._forward["captions"] = captions
        return None

    def _warn_unreplayable(self, batch: Any, fwd: dict[str, Any] | None) -> None:
        gaps = replay_gaps(batch, fwd)
        if gaps:
            warnings.warn("nanscope.watch: a dump of this loop could not be replayed by `nanscope inspect DUMP`: "
                          + "; ".join(gaps[:4]) + (f" (+{len(gaps) - 4} more)" if len(gaps) > 4 else "")
                          + ". Pass the batch in nanscope's schema to check() (docs/batch-format.md); "
                          "this is said once", RuntimeWarning, stacklevel=3)

    def _collect(self, loss_dict: Mapping[str, Tensor | float] | Tensor,
                 grad_norm: Tensor | float | bool | None) -> tuple[list[str], list[Tensor], dict[str, float]]:
        items = [("loss", loss_dict)] if isinstance(loss_dict, Tensor) else list(loss_dict.items())
        if not items:
            raise InputError("check() got an empty loss_dict; expected {term name: 0-dim tensor}")
        if grad_norm is True:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        elif grad_norm is False:
            grad_norm = None
        if grad_norm is not None:
            items.append(("grad_norm", grad_norm))
        scale = self._scale_value()
        if scale is not None:
            items.append(("scale", scale))
        names: list[str] = []
        dev: list[Tensor] = []
        host: dict[str, float] = {}
        device = self._device
        if device is None:  # the accelerator if any term lives there: moving its terms to the CPU would sync
            devices = [v.device for _, v in items if isinstance(v, Tensor)]
            device = next((d for d in devices if d.type != "cpu"), devices[0] if devices else None)
        for name, v in items:
            if isinstance(v, Tensor):
                t = v.detach()
                t = t.reshape(()) if t.numel() == 1 else t.float().sum()  # a sum is non-finite iff some entry is
                names.append(str(name))
                dev.append(t.to(device=device, dtype=torch.float32, non_blocking=True))
            elif isinstance(v, (int, float)):
                host[str(name)] = float(v)
            else:
                raise InputError(f"loss term {name!r} is a {type(v).__name__}; expected a tensor or a number")
        self._device = device
        return names, dev, host

    def _scale_value(self) -> Tensor | float | None:
        return scale_value(self.scaler)

    def _sync_every(self) -> int:
        if self.options.sync_every is not None:
            return min(self.options.sync_every, MAX_SYNC_EVERY)
        if self._sharding is not None:  # the full weights exist only at the bad step's own check
            return 1
        return 50 if self._device is not None and self._device.type == "cuda" else 1

    def _keep_weights(self) -> bool:
        if self.options.keep_weights is not None:
            return self.options.keep_weights
        return self._sync_every() > 1 and self._sharding is None

    def _enqueue(self, rec: StepRecord, dev: list[Tensor]) -> None:
        self._records.append(rec)
        if not dev:
            rec.values = {}
            return
        vec = torch.stack(dev)  # [K] float32: the one vector per step
        if self._keep_weights():
            if self._snapshot is None:
                self._snapshot = WeightSnapshot(self.model)
            self._snapshot.update(keep=self._sticky)
            bad = ~torch.isfinite(vec[: rec.n_fail]).all()
            self._sticky = bad if self._sticky is None else self._sticky | bad
        if vec.device.type == "cpu":
            rec.values = dict(zip(rec.names, vec.tolist()))
            return
        width = max(64, int(vec.numel()))
        slots = self._sync_every() + 2  # at most sync_every records wait for a read
        if self._ring is None or self._ring.shape[1] < width or self._ring.shape[0] < slots:
            self._ring = torch.empty((slots, width), dtype=torch.float32, pin_memory=True)
        rec.slot = self._ring[self._checks % self._ring.shape[0], : vec.numel()]
        rec.slot.copy_(vec, non_blocking=True)
        rec.event = torch.cuda.Event()
        rec.event.record()

    def _scaler_on(self) -> bool:
        return self._scale_value() is not None

    # ------------------------------------------------------------ reading and analysis

    def _drain(self, *, block: bool) -> None:
        while self._unread < len(self._records):
            rec = self._records[self._unread]
            if rec.event is not None:  # CUDA: readable once its copy has landed
                if not block and not rec.event.query():
                    return
                rec.event.synchronize()
                rec.values = dict(zip(rec.names, rec.slot.tolist()))
                rec.slot = rec.event = None
            elif not block:  # CPU: read at the read points, every sync_every checks
                return
            rec.values.update(rec.host)
            self._unread += 1
            self._analyze(rec)

    def _analyze(self, rec: StepRecord) -> None:
        vals = rec.values or {}
        terms = [n for n in vals if n not in ("grad_norm", "scale")]
        bad_terms = [n for n in terms if not math.isfinite(vals[n])]
        scaler_on = "scale" in vals
        kind: str | None = None
        if bad_terms:
            kind = "nonfinite_loss"
        elif "grad_norm" in vals and not math.isfinite(vals["grad_norm"]) and not scaler_on:
            kind = "nonfinite_grad"
        if self._sticky_step is None and not all(math.isfinite(vals[n]) for n in rec.names[: rec.n_fail]):
            self._sticky_step = rec.step  # the device flag froze the weight copy at this step too
        if scaler_on:
            kind = kind or self._amp.track(rec.step, vals["scale"])
        if kind is not None and self._local is None:
            self._local = (rec.step, kind)

    def _sample_final_scale(self) -> None:
        """At close: the last step's skip shows only in the scale after it (one host read, at the end)."""
        if self._report is not None or self._amp.prev is None or scale_value(self.scaler) is None:
            return
        self._drain(block=True)
        self._amp.final(float(self.scaler.get_scale()))

    def _read_point(self) -> None:
        """All records were read and none failed: forget them but the newest (its batch pairs with live weights)."""
        if self._local is None and self._unread == len(self._records):
            self._records = self._records[-1:]
            self._unread = len(self._records)
            self._since_sync = 0

    def _agree(self, current: int | None) -> bool:
        self._drain(block=True)
        local = self._local or (None, None)
        agreement = agree(self.ctx, local[0], local[1])
        self._since_sync = 0
        if agreement.step is None:
            self._read_point()
            return True
        return self._decide(agreement, current=current)

    # ------------------------------------------------------------ failure

    def _decide(self, agreement: Agreement, current: int | None) -> bool:
        """Write this rank's dump of the agreed step and stop (the dump is the one deliberate sync)."""
        with syncs_allowed():
            self._write(agreement, current)
        self._release_buffers()
        return self._stop()

    def _stop(self) -> bool:
        if self.options.on_nonfinite == "raise" and self._report is not None:
            raise NonFiniteStepError(self._report)
        return False

    def _healthy_report(self) -> WatchReport:
        return WatchReport(steps_checked=self._checks, rank=self.ctx.rank, world_size=self.ctx.world_size,
                           overflow_skips=self._amp.skips, overflow_steps=tuple(self._amp.skip_steps),
                           last_scale=self._amp.last_scale)

    # ------------------------------------------------------------ teardown

    def _release_buffers(self) -> None:
        if self._snapshot is not None:
            self._snapshot.release()
        self._snapshot = None
        self._sticky = None
        self._ring = None
        self._records = []
        self._unread = 0
        self._forward = None

    def _teardown(self) -> None:
        if self._closed:
            return
        self._hook.remove()
        if self._inner_hook is not None:
            self._inner_hook.remove()
        self._release_buffers()
        self._closed = True


def recorded_config(config: str | os.PathLike[str]) -> dict[str, Any]:
    """The config's values as JSON, for the dump: `nanscope inspect DUMP` builds from them, never runs the file.

    The caller named the file, so a `.py` config runs here once (as when the model was built)."""
    from nanscope.stacks.formats.safe_config import jsonable, read_values

    values, _ = jsonable(read_values(config, trust_py=True))
    te = values.get("text_encoder_type")
    if isinstance(te, str) and te and not Path(te).is_absolute() and (Path(config).parent / te).is_dir():
        values["text_encoder_type"] = str((Path(config).parent / te).resolve())  # found next to the config
    return values


def watch(
    model: nn.Module,
    dump_dir: str | os.PathLike[str] = "nan-dumps",
    *,
    criterion: Any = None,
    scaler: Any = None,
    config: str | os.PathLike[str] | None = None,
    text_encoder: str | os.PathLike[str] | None = None,
    process_group: Any = None,
    sync_every: int | None = None,
    keep_weights: bool | None = None,
    min_scale: float = WatchOptions.min_scale,
    max_consecutive_skips: int = WatchOptions.max_consecutive_skips,
    on_nonfinite: OnNonFinite = "raise",
) -> Watcher:
    """Watch a training loop for non-finite losses; dump the first bad step so `nanscope inspect DUMP` replays it.

    Args:
        model: the trained module (DDP, torch.compile and PEFT wrappers are fine; under FSDP2/FSDP1 the dump
            gathers the full weights at the agreed bad step, see `nanscope.watch.sharding`).
        dump_dir: where `step{N:08d}-rank{R}/` dump folders go.
        criterion: recorded as 'module:QualName' so a replay can use it again.
        scaler: a `torch.amp.GradScaler` (or an object with `get_scale()`/`_scale`): its skips are counted,
            and a collapsing scale is a failure (NS307).
        config, text_encoder: the groundingdino config file and text encoder folder the model was built
            from, recorded so `nanscope inspect DUMP` can rebuild it (the text encoder is read from the
            model's tokenizer when not given). The config's resolved values go into the manifest as
            JSON, which is what a replay builds from: a dump never makes anyone run the file. A `.py`
            config runs once here (you named it); JSON and YAML are read with safe loaders.
        Raises `OutputError` at once when `dump_dir` cannot be written, `ConfigError` for a config
        that cannot be read.
        process_group: the torch.distributed group the ranks agree in (default: the default group).
        sync_every, keep_weights, min_scale, max_consecutive_skips, on_nonfinite: see `WatchOptions`.
    """
    opts = WatchOptions(sync_every=sync_every, keep_weights=keep_weights, min_scale=min_scale,
                        max_consecutive_skips=max_consecutive_skips, on_nonfinite=on_nonfinite)
    return Watcher(model, dump_dir, options=opts, criterion=criterion, scaler=scaler, config=config,
                   text_encoder=text_encoder, process_group=process_group)


__all__ = ["watch", "Watcher", "WatchOptions", "WatchReport", "NonFiniteStepError"]


