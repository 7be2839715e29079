"""Writing the dump of a bad step: which weights, which batch, the manifest; also when the block raised.

`DumpWriter` is the part of `Watcher` (nanscope.watch.sentinel) that runs once a step has gone bad; it
reads the watcher's records and state and never synchronizes before that point.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from nanscope.watch.ranks import Agreement
from nanscope.watch.records import StepRecord, finite, syncs_allowed
from nanscope.watch.report import BadStep, NonFiniteStepError, manifest, scaler_state
from nanscope.watch.sharding import full_weights, plain_class
from nanscope.watch.snapshot import (
    capture_rng,
    cpu_state_dict,
    model_stack,
    portable_rng,
    schema_batch,
    unwrap,
    write_dump,
)


def check_dump_dir(dump_dir: Path) -> None:
    """Fail when the watcher is created, not at the bad step: `dump_dir` must be (or become) a writable folder.
    Nothing is left behind: the folder itself is only created by the first dump."""
    from nanscope.errors import OutputError

    existing = dump_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"dump_dir {str(dump_dir)!r} cannot be created: {str(existing)!r} is a file, not a folder")
    try:  # a file created and removed at once where the dump folder will go (or in its nearest existing parent)
        with tempfile.TemporaryFile(dir=existing, prefix=".nanscope-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"dump_dir {str(dump_dir)!r} cannot be written: creating a file in {str(existing)!r} "
                          f"failed ({exc.strerror or exc}); pass a dump_dir= the training process can write") from None


def write_dump_atomically(folder: Path, **parts: Any) -> Path:
    """`write_dump` into a hidden temporary folder next to `folder`, renamed to `folder` once complete
    (an older dump there is replaced); on any failure the temporary folder is removed and the error raised."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    old: Path | None = None
    try:
        write_dump(tmp, **parts)
        if folder.exists():
            old = tmp.with_suffix(".replaced")
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old, folder)  # put the older dump back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def dump_failure(folder: Path, exc: BaseException) -> str:
    """'folder: why' for a dump that could not be written. A full disk is said as such: torch.save reports it
    as `RuntimeError: [enforce fail at inline_container.cc] ... file write failed`, so the folder's free
    space decides when the error itself does not say."""
    import errno
    import re

    first = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc)).strip().splitlines()
    detail = f"{type(exc).__name__}: {(first[0] if first else '')[:200]}"
    code = getattr(exc, "errno", None)
    where = folder.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and free < (1 << 20)):
        left = f" ({free} bytes free in {str(where)!r})" if free is not None else ""
        return f"{folder}: no space left on device{left}; free some space or pass another dump_dir="
    if code == errno.EFBIG:
        return f"{folder}: file too large for the file-size limit (ulimit -f) ({detail})"
    return f"{folder}: {detail}"


def criterion_spec(criterion: Any) -> str | None:
    """'module:QualName' of a criterion, when it can be imported again (not from __main__)."""
    if criterion is None:
        return None
    obj = criterion if callable(criterion) and hasattr(criterion, "__qualname__") else type(criterion)
    mod = getattr(obj, "__module__", None)
    if not mod or mod == "__main__" or "<locals>" in obj.__qualname__:
        return None
    return f"{mod}:{obj.__qualname__}"


def stack_meta(model: nn.Module) -> dict[str, Any]:
    """What the model's stack records for a replay (stack name, text encoder, ...); {} for other models."""
    stack = model_stack(model)
    if stack is None:
        return {}
    meta = stack.dump_meta(model)
    if "model_class" in meta:  # FSDP2's generated FSDP<Name> class is not one a replay builds
        meta["model_class"] = plain_class(stack.find_model(model)).__name__
    return meta


class DumpWriter:
    """Mixin of `Watcher`: the dump of the agreed bad step (the one deliberate sync of a run)."""

    def _write(self, agreement: Agreement, current: int | None, *, pending: StepRecord | None = None,
               exception: Mapping[str, str] | None = None, notes: list[str] | None = None,
               collective: bool = True) -> None:
        """Write this rank's dump of `agreement.step`; `pending`: the unchecked step the block raised in.
        `collective`: every rank of the group is here too (an agreement), so FSDP's weights can be gathered."""
        self._drain(block=True)  # we stop here anyway: know exactly where the snapshot froze
        step = int(agreement.step)  # type: ignore[arg-type]
        by_step: dict[int, StepRecord] = {}
        for r in self._records:  # several checks per step (gradient accumulation): the first bad one
            if r.step not in by_step or (finite(by_step[r.step]) and not finite(r)):
                by_step[r.step] = r
        if pending is not None:
            by_step[pending.step] = pending
        rec = by_step.get(step)
        if self._sharding is not None:  # a collective: first, before anything this rank alone decides
            weights, weights_step, weight_notes = self._sharded_weights(agreement, current, collective)
        else:
            weights, weights_step, weight_notes = self._weights_for(step, current)
        notes = list(notes or []) + weight_notes
        if agreement.kind == "scale_collapse" and weights_step is not None and weights_step in by_step:
            rec = by_step[weights_step]  # a collapse: pair the weights we have with their own batch
        elif weights_step is not None and weights_step != step:
            notes.append(f"no checkpoint on this rank: it holds the weights from before step {weights_step}, "
                         f"not {step}; the origin rank's dump has them")
            weights, weights_step = None, None
        bad = BadStep(
            agreement=agreement, rank=self.ctx.rank, world_size=self.ctx.world_size,
            local=self._local or (None, None), batch_step=None if rec is None else rec.step,
            weights_step=weights_step, values=dict(rec.values or {}) if rec is not None else {},
            forward={k: v for k, v in (rec.forward or {}).items() if k in ("autocast", "training")} if rec else {},
            overflow_skips=self._amp.skips, overflow_steps=tuple(self._amp.skip_steps),
            consecutive_skips=self._amp.consecutive, last_scale=self._amp.last_scale, min_scale=self.options.min_scale,
            max_consecutive_skips=self.options.max_consecutive_skips, exception=exception,
        )
        batch, batch_notes = self._dump_batch(rec)
        rng = {"before_forward": portable_rng(rec.forward["rng"]) if rec is not None and rec.forward else None,
               "at_check": portable_rng(rec.rng_at_check) if rec is not None else None}
        folder = self.dump_dir / f"step{step:08d}-rank{self.ctx.rank}"
        meta = manifest(bad, model_class=plain_class(unwrap(self.model)).__name__, stack=self.stack_meta,
                        config=self.config, config_values=self.config_values, text_encoder=self.text_encoder,
                        criterion=self.criterion_spec, scaler=scaler_state(self.scaler),
                        device=self._device or torch.device("cpu"),
                        steps_checked=self._checks, notes=notes + batch_notes)
        if self._sharding is not None:
            meta["sharding"] = self._sharding
        try:
            write_dump_atomically(folder, state_dict=weights, batch=batch, rng=rng, manifest=meta)
        except Exception as exc:  # noqa: BLE001 (disk full, read-only, size limit, ...: never lose the step)
            self._report = bad.report(self._checks, None, dump_error=dump_failure(folder, exc))
            return
        self._report = bad.report(self._checks, folder)

    def _dumps_for(self, exc: BaseException | None) -> bool:
        """An error (not Ctrl-C or SystemExit), not the sentinel's own, and the run has not failed already."""
        return (isinstance(exc, Exception) and not isinstance(exc, NonFiniteStepError)
                and self._report is None and not self._closed)

    def _dump_exception(self, exc: Exception) -> None:
        """The block raised: dump the first bad step still unread, else the step the model ran for; never raise."""
        raised = {"type": type(exc).__qualname__, "module": type(exc).__module__, "message": str(exc)[:4000]}
        what = f"{raised['type']}: {raised['message'][:300]}"
        try:
            with syncs_allowed():
                self._drain(block=True)  # a late read may hold an earlier bad step: that one comes first
                if self._local is not None:
                    self._write(self._local_agreement(*self._local), None, collective=False,
                                notes=[f"after this step the watched block raised {what}"])
                elif self._forward is not None:
                    step = 0 if self._last_step is None else self._last_step + 1
                    pending = StepRecord(step=step, names=(), n_fail=0, host={}, batch=None, forward=self._forward,
                                      rng_at_check=capture_rng(), values={}, checked=False)
                    self._local = (step, "exception")
                    self._write(self._local_agreement(step, "exception"), step, pending=pending, exception=raised,
                                collective=False,
                                notes=[f"the block raised {raised['type']} (see 'exception') after the model's "
                                       "forward and before check(); the step number is the last checked step + 1"])
                else:
                    return
        except Exception as err:  # the dump must never hide the user's exception
            warnings.warn(f"nanscope.watch: the block raised {raised['type']}; writing its dump failed too "
                          f"({type(err).__name__}: {str(err)[:300]})", RuntimeWarning, stacklevel=3)
            return
        finally:
            self._release_buffers()
        rep = self.report
        if rep.dump is None:
            warnings.warn(f"nanscope.watch: the block raised {raised['type']}; step {rep.step} ({rep.reason}) "
                          f"could not be dumped: {rep.dump_error}", RuntimeWarning, stacklevel=3)
            return
        warnings.warn(f"nanscope.watch: the block raised {raised['type']}; step {rep.step} ({rep.reason}) was "
                      f"dumped to {rep.dump}; replay it with `nanscope inspect {rep.dump}`", RuntimeWarning,
                      stacklevel=3)

    def _local_agreement(self, step: int, kind: str) -> Agreement:
        """This rank's own failure, decided without the other ranks (they may never get here)."""
        return Agreement(tuple((step, kind) if r == self.ctx.rank else (None, None)
                               for r in range(self.ctx.world_size)))

    def _weights_for(self, step: int, current: int | None) -> tuple[dict[str, Tensor] | None, int | None, list[str]]:
        """The weights from before `step` if this rank still has them, else the closest it has, and notes."""
        if current is not None and current == step:
            return cpu_state_dict(self.model), step, []  # inside check(step): optimizer.step() has not run
        if self._snapshot is not None and self._snapshot.filled:
            frozen = self._sticky_step if self._sticky_step is not None else self._records[-1].step
            return self._snapshot.state_dict(), frozen, []
        if current is not None:
            return cpu_state_dict(self.model), current, []
        return None, None, [f"no checkpoint: step {step} was read after later optimizer steps and no weight copy "
                            "was kept (keep_weights=False)"]

    def _sharded_weights(self, agreement: Agreement, current: int | None,
                         collective: bool) -> tuple[dict[str, Tensor] | None, int | None, list[str]]:
        """FSDP: the full weights, gathered from every rank's shards at the check of the agreed step itself
        (`nanscope.watch.sharding`), on the rank whose dump the replay reads (the first origin rank)."""
        step = int(agreement.step)  # type: ignore[arg-type]
        how = {"fsdp2": "FSDP2 (fully_shard)", "fsdp1": "FSDP1 (FullyShardedDataParallel)"}[self._sharding]
        if not collective:
            return None, None, [f"no checkpoint: the model is sharded with {how}, and gathering its full weights "
                                "is a collective the other ranks do not join once this rank's block raised"]
        if current is None or current != step:
            return None, None, [f"no checkpoint: the model is sharded with {how} and step {step} was read after "
                                "later optimizer steps; its full weights are gathered at the check of the bad step "
                                "itself (the default sync_every=1 under FSDP does that)"]
        writer = agreement.origin_ranks[0] if agreement.origin_ranks else 0
        target = self._stack.find_model(self.model) if self._stack is not None else unwrap(self.model)
        try:
            full = full_weights(self.model, target, self.ctx, writer)
        except Exception as exc:  # noqa: BLE001 (torch refused this wrapping: the dump keeps the rest)
            return None, None, [f"no checkpoint: gathering the full weights of the {how} model failed "
                                f"({type(exc).__name__}: {str(exc)[:300]})"]
        if full is None:
            return None, None, [f"no checkpoint on this rank: the full weights, gathered from every rank's {how} "
                                f"shards, are in rank {writer}'s dump of step {step}"]
        return full, step, [f"checkpoint.pth holds the full weights gathered from every rank's {how} shards"]

    def _dump_batch(self, rec: StepRecord | None) -> tuple[dict[str, Any] | None, list[str]]:
        if rec is None:
            return None, ["this rank holds no record of the step"]
        if rec.batch is not None:
            return _inner_captions(*schema_batch(rec.batch), rec.forward)
        if rec.forward is not None:  # fall back on what the model was called with
            out, notes = _inner_captions(*_call_batch(rec.forward["args"], rec.forward["kwargs"]), rec.forward)
            given = ("check() was given no batch" if rec.checked
                     else "the step raised before check(), so no batch was given")
            if "targets" in out:
                return out, notes + [f"{given}: images, captions and targets come from the model call"]
            if "labels" in out:  # transformers' form
                return out, notes + [f"{given}: pixel_values, input_ids and labels come from the model call"]
            notes.append(f"{given}: images and captions come from the model call, targets are missing")
            images, captions = out.get("images"), out.get("captions")
            if isinstance(images, Tensor) and images.dim() == 4 and len(captions or ()) == images.shape[0]:
                out["targets"] = [{"boxes": torch.zeros(0, 4), "phrases": []} for _ in range(images.shape[0])]
                notes.append("batch.pt holds each image without boxes so that `nanscope inspect DUMP` can replay "
                             "the forward; its loss terms are not the training loss's")
            return out, notes
        return None, ["check() was given no batch and the model was not called since the last check"]


def _inner_captions(out: dict[str, Any], notes: list[str],
                    forward: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Captions the detector received (a wrapper built them, e.g. from class_names) when the batch has none."""
    captions = (forward or {}).get("captions")
    if "captions" not in out and captions:
        out["captions"] = list(captions)
        notes.append("captions come from the GroundingDINO call inside the model (the batch had none)")
    return out, notes


def _call_batch(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A model call `model(images, captions=...)`, groundingdino's `model(samples, targets)` or transformers'
    `model(pixel_values=..., input_ids=..., labels=...)` as a batch to dump."""
    if "pixel_values" in kwargs and "input_ids" in kwargs:
        return _hf_call_batch(kwargs)
    images = args[0] if args else kwargs.get("samples", kwargs.get("images"))
    raw: dict[str, Any] = {"images": images, "captions": kwargs.get("captions"), "targets": kwargs.get("targets")}
    second = args[1] if len(args) > 1 else None
    if isinstance(second, (list, tuple)) and second:
        if all(isinstance(t, Mapping) for t in second):
            raw["targets"] = raw["targets"] or second  # groundingdino's forward(samples, targets)
        elif all(isinstance(c, str) for c in second):
            raw["captions"] = raw["captions"] or second
    return schema_batch({k: v for k, v in raw.items() if v is not None})


def _hf_call_batch(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """transformers' keyword call; without `labels` each image gets no boxes, so the forward can be replayed."""
    from nanscope.replay.hf_batch import hf_batch_dict

    out, notes = hf_batch_dict(kwargs)
    notes = [n for n in notes if not n.startswith("dropped batch keys")]
    if not out.get("labels"):
        b = int(out["pixel_values"].shape[0])
        out["labels"] = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
                         for _ in range(b)]
        notes.append("the model was called without labels: batch.pt holds each image without boxes so that "
                     "`nanscope inspect DUMP` can replay the forward; its loss terms are not the training loss's")
    return out, notes
