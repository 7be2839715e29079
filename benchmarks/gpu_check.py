"""GPU checks on one CUDA device, full-size GroundingDINO SwinT-OGC (random weights, tiny text encoder).

    python benchmarks/gpu_check.py [--steps 6] [--batch 4] [--size 800] [--sections ...] [--json out.json]

Sections (each returns table rows), in fp32, bf16 autocast and fp16 autocast where it applies:

  watch   plain vs watched training steps in fp32, bf16 autocast and fp16 autocast + GradScaler
          (fused AdamW, gradient clipping, a sync-free masked loss), interleaved, medians. The
          watcher's own calls run under `torch.cuda.set_sync_debug_mode("error")`; the syncs of a
          whole plain and a whole watched step are counted with mode "warn" (they must be equal).
          Then a NaN is planted at step k under bf16: the sentinel must name step k although it
          reads late, its dump must hold the weights from before step k, and replaying the dump on
          this GPU must give the non-finite term again.
  capture plain forward vs forward inside `nanscope.stacks.capture.capture(model)` (no_grad, eval, as
          `inspect` runs it), interleaved, medians. The syncs of one plain and one captured forward
          are counted with mode "warn" (they must be equal: the model's own); then every capture
          hook runs under mode "error" (the hooks are wrapped, the model's own syncs are not; as a
          control, a wrapped `.item()` must raise).
  inspect the model saved to a checkpoint and loaded back with `nanscope.replay.prepare(...,
          device=...)` (timed), then `inspect_replay(criterion=NaiveCriterion)` in fp32 and with
          --amp bf16 / fp16: wall time, syncs counted, finding codes; NS101 (padded -inf logits
          reaching the loss) must be among them.
  verify  `verify_replay(replay, steps=2)` on the same replay (fp32: verify-fix has no --amp):
          wall time and one row per check, PASS or FAIL.
  trace   one training step (forward + the sync-free masked loss + backward, fp32) plain, under
          `trace_nonfinite` (two phases), under the op-level trace of the whole step (`two_phase=False`)
          and under `detect_anomaly(check_nan=True)`, interleaved, medians, the host syncs of each
          counted with mode "warn". Target: the trace below detect_anomaly. Then a NaN planted in one
          decoder weight: the trace must name that module's op from the replay of its call alone. Then a NaN
          that starts in one module's backward (`trace_overhead.BadBackward` after a decoder linear1): the
          two-phase trace (host syncs counted) must name what the op-level trace names, from the replay of
          that call's backward alone.
  attach  training steps (fp32, fused AdamW, gradient clipping, the sync-free masked loss as a criterion
          module) plain and with `nanscope.watch.attach(criterion, model=...)`, interleaved, medians; the
          criterion call (with attach's hook) runs under sync debug mode "error", and the syncs of one whole
          plain and one whole attached step are counted with mode "warn" (they must be equal). Target:
          ratio <= 1.02 (reported as `ratio_within_1.02`, not a failure: a CPU dry run is too noisy).

Exits 0 with a message when there is no CUDA device; exit 1 when a row fails. On one H100 (torch
2.11) the watch section took 35 s with --steps 3; the capture, inspect and verify sections have
not been timed on a GPU yet. `--device cpu --demo --batch 2 --size 224` is a dry run of the script
itself on a CPU (no sync checks there; the bf16/fp16 autocast rows are slow on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torchvision.ops import sigmoid_focal_loss  # noqa: E402

CAPTIONS = ["cat . dog . person .", "a red car next to a bus .", "zebra . giraffe .", "bird . kite . tree ."]
PHRASES = [["cat", "dog", "person"], ["red car", "bus"], ["zebra", "giraffe"], ["bird", "kite", "tree"]]
AMPS = ("fp32", "bf16", "fp16")


@dataclass
class Row:
    section: str
    name: str
    values: dict[str, Any] = field(default_factory=dict)
    ok: bool = True


@dataclass
class Setup:
    device: torch.device
    batch: int
    size: int
    steps: int
    tmp: Path
    text_encoder: Path
    make_model: Callable[[], torch.nn.Module]
    config: Path | None = None  # None: groundingdino's SwinT-OGC config
    replay: Any = None  # the inspect/verify replay, built once (see get_replay)


# ------------------------------------------------------------------ shared pieces


def make_batch(setup: Setup, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    b = setup.batch
    targets = []
    for i in range(b):
        phrases = PHRASES[i % 4]  # one box per phrase: the batch passes nanscope's schema check
        n = len(phrases)
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.2 + 0.05
        targets.append({"boxes": torch.cat([cxcy, wh], 1), "phrases": list(phrases)})
    return {"images": torch.randn(b, 3, setup.size, setup.size, generator=g),
            "captions": [CAPTIONS[i % 4] for i in range(b)], "targets": targets}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {"images": batch["images"].to(device, non_blocking=True), "captions": batch["captions"],
            "targets": [{**t, "boxes": t["boxes"].to(device, non_blocking=True)} for t in batch["targets"]]}


def masked_loss(out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Sync-free: focal on valid text positions (padded -inf replaced first), L1 on the first queries."""
    logits = out["pred_logits"].float()
    valid = logits != float("-inf")
    safe = torch.where(valid, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    n = max(sum(len(t["boxes"]) for t in batch["targets"]), 1)
    loss_ce = (sigmoid_focal_loss(safe, torch.zeros_like(safe), reduction="none") * valid).sum() / n
    boxes = out["pred_boxes"].float()
    loss_bbox = sum((boxes[i, : len(t["boxes"])] - t["boxes"]).abs().sum() for i, t in enumerate(batch["targets"])) / n
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox}


def autocast_for(device_type: str, amp: str) -> Any:
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@contextlib.contextmanager
def sync_mode(mode: str) -> Iterator[None]:
    if not torch.cuda.is_available():  # the --device cpu dry run: nothing to watch
        yield
        return
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


@contextlib.contextmanager
def count_syncs(into: list[int]) -> Iterator[None]:
    """Count synchronizing CUDA calls (sync debug mode "warn") inside the block."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with sync_mode("warn"):
            yield
    into.append(sum(1 for w in seen if "synchroniz" in str(w.message).lower()))


def _error(exc: BaseException) -> dict[str, str]:
    """An exception as table values: the message and where it came from (the last frames)."""
    import traceback

    return {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "where": traceback.format_exc()[-800:]}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------ section: watch


class _Loop:
    """One model + optimizer (+ scaler, + watcher) running the same training step."""

    def __init__(self, model: torch.nn.Module, amp: str, watched: bool, dump_dir: Path) -> None:
        from nanscope.watch.sentinel import watch

        self.model, self.amp = model, amp
        self.device_type = next(model.parameters()).device.type
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # sync-free with a GradScaler
        self.scaler = torch.amp.GradScaler(self.device_type) if amp == "fp16" else None
        self.watcher = watch(model, dump_dir, scaler=self.scaler, on_nonfinite="raise") if watched else None
        self.check_s: list[float] = []
        self.step_i = 0

    def autocast(self) -> Any:
        return autocast_for(self.device_type, self.amp)

    def step(self, batch: dict[str, Any], *, guard: bool) -> float:
        """One step; the watcher's call under sync debug mode "error" when `guard`. Returns the loss (a sync, as logging does)."""
        with self.autocast():
            out = self.model(batch["images"], captions=batch["captions"])
            terms = masked_loss(out, batch)
        loss = sum(terms.values())
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.1, foreach=True)
        if self.watcher is not None:
            t0 = time.perf_counter()
            with sync_mode("error") if guard else contextlib.nullcontext():
                self.watcher.check(self.step_i, terms, batch, grad_norm=gn)
            self.check_s.append(time.perf_counter() - t0)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.step_i += 1
        return loss


def section_watch(setup: Setup) -> list[Row]:
    from nanscope.watch.snapshot import capture_rng

    rows: list[Row] = []
    dev = setup.device
    base = setup.make_model()
    with sync_mode("error"):
        capture_rng()  # what the forward pre-hook runs (CUDA is initialized now): must not sync either
    batches = [to_device(make_batch(setup, s), dev) for s in range(2)]
    for amp in ("fp32", "bf16", "fp16"):
        row = Row("watch", amp)
        try:
            plain = _Loop(copy.deepcopy(base).train(), amp, False, setup.tmp / f"unused-{amp}")
            watched = _Loop(copy.deepcopy(base).train(), amp, True, setup.tmp / f"dumps-{amp}")
            times: dict[str, list[float]] = {"plain": [], "watched": []}
            for i in range(2 + setup.steps):
                for name, loop in (("plain", plain), ("watched", watched)) if i % 2 else (("watched", watched), ("plain", plain)):
                    synchronize()
                    t0 = time.perf_counter()
                    loss = loop.step(batches[i % 2], guard=True)
                    float(loss)  # the loop's own logging sync
                    synchronize()
                    if i >= 2:
                        times[name].append(time.perf_counter() - t0)
            syncs: dict[str, list[int]] = {"plain": [], "watched": []}
            for name, loop in (("plain", plain), ("watched", watched)):
                with count_syncs(syncs[name]):
                    loop.step(batches[0], guard=False)
                synchronize()
            copy_bytes = watched.watcher.weight_copy_bytes
            rep = watched.watcher.close()
            mp, mw = statistics.median(times["plain"]), statistics.median(times["watched"])
            row.values = {
                "plain_s": round(mp, 4), "watched_s": round(mw, 4), "ratio": round(mw / mp, 3),
                "check_ms": round(statistics.median(watched.check_s) * 1e3, 3),
                "syncs_in_check": 0 if torch.cuda.is_available() else None,  # a sync in check() raised above
                "syncs_plain_step": syncs["plain"][0], "syncs_watched_step": syncs["watched"][0],
                "overflow_skips": rep.overflow_skips, "failed": rep.failed,
                "weight_copy_MB": round(copy_bytes / 2**20, 1),
                "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
            }
            row.ok = syncs["plain"][0] == syncs["watched"][0] and not rep.failed
        except Exception as exc:  # report and go on with the next mode
            row.ok = False
            row.values = _error(exc)
        finally:
            plain = watched = None  # type: ignore[assignment]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows.append(row)
    try:
        rows.append(_planted_nan(setup, base))
    except Exception as exc:  # report, do not lose the table
        rows.append(Row("watch", "planted NaN (bf16)", _error(exc), ok=False))
    return rows


def _planted_nan(setup: Setup, base: torch.nn.Module) -> Row:
    """bf16, NaN in one image at step k: named at step k after a late read; the dump replays on this GPU."""
    from nanscope.watch.sentinel import NonFiniteStepError

    row = Row("watch", "planted NaN (bf16)")
    k = 3
    loop = _Loop(copy.deepcopy(base).train(), "bf16", True, setup.tmp / "dumps-planted")
    before_k: dict[str, torch.Tensor] = {}
    raised_at = None
    try:
        for i in range(10):
            b = to_device(make_batch(setup, i), setup.device)
            if i == k:
                b["images"][min(1, setup.batch - 1), 0, 100, 100] = float("nan")
                before_k = {n: v.detach().cpu().clone() for n, v in loop.model.state_dict().items()}
            raised_at = i
            loop.step(b, guard=True)  # no logging sync here: the read must come from the CUDA event
        raised_at = None
        loop.watcher.poll()  # type: ignore[union-attr]
    except NonFiniteStepError as exc:
        rep = exc.report
        ckpt = torch.load(rep.dump / "checkpoint.pth", weights_only=True)["model"]
        same = all(torch.equal(ckpt[n], v) for n, v in before_k.items())
        fresh = setup.make_model().to(setup.device).train()
        fresh.load_state_dict(ckpt)
        batch = torch.load(rep.dump / "batch.pt", weights_only=True)
        with torch.no_grad(), torch.autocast(setup.device.type, dtype=torch.bfloat16):
            replay = masked_loss(fresh(batch["images"].to(setup.device), captions=batch["captions"]),
                                 to_device(batch, setup.device))
        bad = sorted(n for n, v in replay.items() if not math.isfinite(float(v)))
        row.values = {"planted_step": k, "reported_step": rep.step, "detected_at_check": raised_at,
                      "terms": ",".join(rep.nonfinite_terms), "weights_before_k": same, "replay_nonfinite": ",".join(bad),
                      "dump": str(rep.dump)}
        row.ok = rep.step == k and same and bool(bad)
        return row
    finally:
        loop.watcher.close()  # type: ignore[union-attr]
    row.ok = False
    row.values = {"error": "the sentinel never fired"}
    return row


# ------------------------------------------------------------------ section: capture

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


def _hook_keys(model: torch.nn.Module) -> set[tuple[int, str, int]]:
    return {(id(m), d, k) for m in model.modules() for d in _HOOK_DICTS for k in getattr(m, d)}


def _under_sync_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with sync_mode("error"):
            return fn(*args, **kwargs)

    return run


def _guard_new_hooks(model: torch.nn.Module, before: set[tuple[int, str, int]]) -> int:
    """Run every forward hook added since `before` under sync debug mode "error"; returns how many.

    The hook dicts are edited in place (same keys), so the with_kwargs / always_call flags and the
    handles that remove them on exit stay valid.
    """
    n = 0
    for m in model.modules():
        for d in _HOOK_DICTS:
            hooks = getattr(m, d)
            for k, fn in list(hooks.items()):
                if (id(m), d, k) not in before:
                    hooks[k] = _under_sync_error(fn)
                    n += 1
    return n


def _guard_control(device: torch.device) -> str | None:
    """The guard must bite: a wrapped function that reads a CUDA value (`.item()`) has to raise."""
    if device.type != "cuda":
        return None
    x = torch.ones((), device=device)
    try:
        _under_sync_error(lambda: x.item())()
    except RuntimeError:
        return "raised"
    return "did not raise"


def section_capture(setup: Setup) -> list[Row]:
    from nanscope.stacks.capture import ForwardRecord, capture

    rows: list[Row] = []
    model = setup.make_model().eval()
    batch = to_device(make_batch(setup, 0), setup.device)
    images, captions = batch["images"], batch["captions"]
    dec_layers = len(model.class_embed)
    control = _guard_control(setup.device)

    def plain() -> None:
        model(images, captions=captions)

    def captured() -> ForwardRecord:
        with capture(model) as cap:
            model(images, captions=captions)
        return cap.last

    for amp in AMPS:
        row = Row("capture", amp)
        try:
            with torch.no_grad(), autocast_for(setup.device.type, amp):
                plain()  # warm-up (cuDNN/cuBLAS choices, autocast caches)
                captured()
                times: dict[str, list[float]] = {"plain": [], "capture": []}
                for i in range(max(setup.steps, 3)):
                    for name, fn in (("plain", plain), ("capture", captured)) if i % 2 else (("capture", captured), ("plain", plain)):
                        synchronize()
                        t0 = time.perf_counter()
                        fn()
                        synchronize()
                        times[name].append(time.perf_counter() - t0)
                syncs: dict[str, list[int]] = {"plain": [], "capture": []}
                with count_syncs(syncs["plain"]):
                    plain()
                with count_syncs(syncs["capture"]):
                    captured()
                synchronize()
                before = _hook_keys(model)
                with capture(model) as cap:
                    guarded = _guard_new_hooks(model, before)
                    model(images, captions=captions)  # a hook that syncs raises here
                rec = cap.last
            left = len(_hook_keys(model))
            complete = (rec.num_layers == dec_layers and rec.references is not None and rec.enc_logits_all is not None
                        and rec.text_token_mask is not None and rec.outputs is not None)
            mp, mc = statistics.median(times["plain"]), statistics.median(times["capture"])
            row.values = {"plain_ms": round(mp * 1e3, 2), "capture_ms": round(mc * 1e3, 2), "ratio": round(mc / mp, 3),
                          "syncs_plain_fwd": syncs["plain"][0], "syncs_capture_fwd": syncs["capture"][0],
                          "hooks_under_error": guarded, "guard_control": control,
                          "syncs_in_hooks": 0 if torch.cuda.is_available() else None,  # a sync in a hook raised above
                          "layers": f"{rec.num_layers}+enc" if rec.enc_logits_all is not None else rec.num_layers,
                          "hooks_left": left}
            row.ok = (syncs["plain"][0] == syncs["capture"][0] and complete and guarded > 0 and left == 0
                      and control in ("raised", None))
        except Exception as exc:  # report and go on with the next mode
            row.ok = False
            row.values = _error(exc)
        rows.append(row)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ sections: inspect, verify


def get_replay(setup: Setup) -> tuple[Any, Row]:
    """The full-size model saved as a checkpoint and loaded back by `prepare`, as `nanscope inspect` does; once."""
    if setup.replay is not None:
        return setup.replay, Row("inspect", "prepare (cached)")
    from nanscope.replay.batch import validate_batch
    from nanscope.replay.session import prepare

    folder = setup.tmp / "replay"
    folder.mkdir(exist_ok=True)
    model = setup.make_model()
    ckpt = folder / "checkpoint.pth"
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, ckpt)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    batch = validate_batch(make_batch(setup, 0), source="gpu_check batch 0")
    t0 = time.perf_counter()
    replay = prepare(ckpt, batch, config=setup.config, text_encoder=str(setup.text_encoder), device=str(setup.device))
    fit = replay.key_fit
    row = Row("inspect", "prepare", {"prepare_s": round(time.perf_counter() - t0, 2),
                                     "checkpoint_MB": round(ckpt.stat().st_size / 2**20, 1),
                                     "keys_matched": len(fit.matched), "missing": len(fit.missing),
                                     "mismatched": len(fit.mismatched)})
    row.ok = not fit.missing and not fit.mismatched
    setup.replay = replay
    return replay, row


def section_inspect(setup: Setup) -> list[Row]:
    from nanscope.replay.diagnose import inspect_replay

    try:
        replay, prep = get_replay(setup)
    except Exception as exc:
        return [Row("inspect", "prepare", _error(exc), ok=False)]
    rows = [prep]
    for amp in AMPS:
        row = Row("inspect", amp)
        try:
            syncs: list[int] = []
            synchronize()
            t0 = time.perf_counter()
            with count_syncs(syncs):
                result = inspect_replay(replay, criterion="nanscope.criterion:NaiveCriterion",
                                        amp=None if amp == "fp32" else amp)
            synchronize()
            codes = [f.code for f in result.findings]
            row.values = {"inspect_s": round(time.perf_counter() - t0, 2), "syncs": syncs[0],
                          "codes": ",".join(codes), "exit": result.exit_code,
                          "criterion_error": bool(result.summary.get("criterion_error"))}
            row.ok = "NS101" in codes  # the padded -inf logits a naive loss sees: the diagnosis inspect exists for
        except Exception as exc:
            row.ok = False
            row.values = _error(exc)
        rows.append(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def section_verify(setup: Setup) -> list[Row]:
    from nanscope.verify.pipeline import verify_replay

    rows: list[Row] = []
    try:
        replay, prep = get_replay(setup)
    except Exception as exc:
        return [Row("verify", "prepare", _error(exc), ok=False)]
    if prep.name == "prepare":
        rows.append(Row("verify", prep.name, prep.values, prep.ok))
    row = Row("verify", "verify-fix fp32")
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        synchronize()
        t0 = time.perf_counter()
        result = verify_replay(replay, steps=2)
        synchronize()
        mem = result.tables.get("memory", {})
        row.values = {"wall_s": round(time.perf_counter() - t0, 2), "steps": 2,
                      "passed": f"{sum(c.passed for c in result.checks)}/{len(result.checks)}",
                      "verdict": result.verdict,
                      "loss_mem_ratio": round(mem["ratio"], 3) if isinstance(mem.get("ratio"), float) else mem.get("ratio"),
                      "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None}
        row.ok = len(result.checks) == 9
        rows.append(row)
        for c in result.checks:
            rows.append(Row("verify", f"check {c.id}", {"result": "PASS" if c.passed else "FAIL", "name": c.name,
                                                          **({} if c.passed else {"detail": c.detail[:300]})},
                            ok=c.passed))
    except Exception as exc:
        row.ok = False
        row.values = _error(exc)
        rows.append(row)
    return rows


# ------------------------------------------------------------------ section: trace


def section_trace(setup: Setup) -> list[Row]:
    from nanscope.trace.tracer import trace_nonfinite

    model = setup.make_model().train()
    batch = to_device(make_batch(setup, 0), setup.device)

    def run() -> dict[str, torch.Tensor]:
        return masked_loss(model(batch["images"], captions=batch["captions"]), batch)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        sum(run().values()).backward()

    def anomaly() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autograd.detect_anomaly(check_nan=True):
            sum(run().values()).backward()

    cases: dict[str, Callable[[], Any]] = {
        "plain": plain, "trace": lambda: trace_nonfinite(model, run),
        "op_level": lambda: trace_nonfinite(model, run, two_phase=False), "anomaly": anomaly}
    row = Row("trace", "fp32 step")
    try:
        times: dict[str, list[float]] = {k: [] for k in cases}
        for i in range(1 + setup.steps):
            for name, f in cases.items():
                synchronize()
                t0 = time.perf_counter()
                f()
                synchronize()
                if i:
                    times[name].append(time.perf_counter() - t0)
        syncs: dict[str, list[int]] = {k: [] for k in cases}
        for name, f in cases.items():
            with count_syncs(syncs[name]):
                f()
            synchronize()
        med = {k: statistics.median(v) for k, v in times.items()}
        r = trace_nonfinite(model, run)
        row.values = {**{f"{k}_s": round(v, 4) for k, v in med.items()},
                      "trace_ratio": round(med["trace"] / med["plain"], 2),
                      "op_level_ratio": round(med["op_level"] / med["plain"], 2),
                      "anomaly_ratio": round(med["anomaly"] / med["plain"], 2),
                      **{f"syncs_{k}": v[0] for k, v in syncs.items()},
                      "module_calls": r.module_calls, "replayed": list(r.replayed),
                      "full_trace_reason": r.full_trace_reason}
        row.ok = med["trace"] < med["anomaly"] and r.full_trace_reason is None
    except Exception as exc:
        row.ok, row.values = False, _error(exc)
    rows = [row]
    planted = Row("trace", "planted NaN weight")
    saved = model.transformer.decoder.layers[0].linear1.weight[0, 0].item()
    try:
        name = "transformer.decoder.layers.0.linear1"
        with torch.no_grad():
            model.get_submodule(name).weight[0, 0] = float("nan")  # put back to `saved` below
        t0 = time.perf_counter()
        r = trace_nonfinite(model, run, backward=False)
        synchronize()
        o = r.forward
        planted.values = {"s": round(time.perf_counter() - t0, 3), "module": o.module if o else None,
                          "op": o.op if o else None, "source": o.source if o else None,
                          "replayed": list(r.replayed), "full_trace_reason": r.full_trace_reason}
        planted.ok = o is not None and o.module == name and o.source == f"parameter {name}.weight"
    except Exception as exc:
        planted.ok, planted.values = False, _error(exc)
    finally:
        with torch.no_grad():
            model.transformer.decoder.layers[0].linear1.weight[0, 0] = saved
    return rows + [planted, _backward_nan(model, run)]


def _backward_nan(model: torch.nn.Module, run: Callable[[], Any]) -> Row:
    """A NaN that starts in one module's backward (forward unchanged): named from the replay of that call's
    backward alone, as the op-level trace of the whole step names it; one step of each, with the host syncs."""
    from trace_overhead import BadBackward  # benchmarks/ is on sys.path when run as a script

    from nanscope.trace.tracer import trace_nonfinite

    row = Row("trace", "backward NaN")
    layer = model.transformer.decoder.layers[0]
    original = layer.linear1
    bad = BadBackward()
    bad.on = True
    layer.linear1 = torch.nn.Sequential(original, bad)
    try:
        values: dict[str, Any] = {}
        results = {}
        for name, f in (("trace", lambda: trace_nonfinite(model, run)),
                        ("op_level", lambda: trace_nonfinite(model, run, two_phase=False))):
            synchronize()
            t0 = time.perf_counter()
            results[name] = f()
            synchronize()
            values[f"{name}_s"] = round(time.perf_counter() - t0, 3)
        syncs: list[int] = []
        with count_syncs(syncs):
            trace_nonfinite(model, run)
        quick, full = results["trace"], results["op_level"]

        def key(o: Any) -> tuple[Any, ...]:
            return (o.phase, o.op, o.module, o.kind, o.nan_count, o.inf_count, o.grad_fn, o.frame)

        values.update({"syncs_trace": syncs[0], "origin": f"{quick.backward.op} ({quick.backward.grad_fn}) in "
                       f"{quick.backward.module}" if quick.backward else None,
                       "replayed_backward": list(quick.replayed_backward), "full_trace_reason": quick.full_trace_reason,
                       "same_as_op_level": [key(o) for o in quick.origins] == [key(o) for o in full.origins]})
        row.values = values
        row.ok = (quick.full_trace_reason is None and values["same_as_op_level"] and quick.backward is not None
                  and quick.backward.module == "transformer.decoder.layers.0.linear1.1")
    except Exception as exc:
        row.ok, row.values = False, _error(exc)
    finally:
        layer.linear1 = original
    return row


# ------------------------------------------------------------------ section: attach


class _Criterion(torch.nn.Module):
    """`masked_loss` as a criterion module, what `nanscope.watch.attach` hooks in a loop nanscope does not own."""

    def forward(self, out: dict[str, torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return masked_loss(out, {"targets": targets})


def section_attach(setup: Setup) -> list[Row]:
    """Training steps (fp32, fused AdamW, gradient clipping) plain and with `attach` on the criterion."""
    from nanscope.watch.attachment import attach

    dev = setup.device
    base = setup.make_model()
    batches = [to_device(make_batch(setup, s), dev) for s in range(2)]
    row = Row("attach", "fp32 criterion")
    attachment = None
    try:
        loops = {}
        for name in ("plain", "attached"):
            model, crit = copy.deepcopy(base).train(), _Criterion()
            loops[name] = (model, crit, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True))
        model, crit, _ = loops["attached"]
        attachment = attach(crit, setup.tmp / "attach-dumps", model=model, trackers=None)

        def step(name: str, batch: dict[str, Any], guard: bool) -> torch.Tensor:
            model, crit, opt = loops[name]
            out = model(batch["images"], captions=batch["captions"])
            with sync_mode("error") if guard else contextlib.nullcontext():  # the criterion and attach's hook
                terms = crit(out, batch["targets"])
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1, foreach=True)
            opt.step()
            return loss

        times: dict[str, list[float]] = {"plain": [], "attached": []}
        for i in range(2 + setup.steps):
            for name in ("plain", "attached") if i % 2 else ("attached", "plain"):
                synchronize()
                t0 = time.perf_counter()
                float(step(name, batches[i % 2], guard=True))  # the loop's own logging sync
                synchronize()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
        syncs: dict[str, list[int]] = {"plain": [], "attached": []}
        for name in syncs:
            with count_syncs(syncs[name]):
                step(name, batches[0], guard=False)
            synchronize()
        rep = attachment.detach()
        attachment = None
        mp, ma = statistics.median(times["plain"]), statistics.median(times["attached"])
        row.values = {"plain_s": round(mp, 4), "attached_s": round(ma, 4), "ratio": round(ma / mp, 3),
                      "ratio_within_1.02": ma / mp <= 1.02,
                      "syncs_in_hook": 0 if torch.cuda.is_available() else None,  # a sync under "error" raised
                      "syncs_plain_step": syncs["plain"][0], "syncs_attached_step": syncs["attached"][0],
                      "steps_checked": rep.steps_checked, "nonfinite_steps": list(rep.nonfinite_steps)}
        row.ok = (syncs["plain"][0] == syncs["attached"][0] and rep.steps_checked == 3 + setup.steps
                  and not rep.nonfinite_steps)
    except Exception as exc:
        row.ok, row.values = False, _error(exc)
    finally:
        if attachment is not None:
            attachment.detach()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return [row]


SECTIONS: dict[str, Callable[[Setup], list[Row]]] = {"watch": section_watch, "capture": section_capture,
                                                     "inspect": section_inspect, "verify": section_verify,
                                                     "trace": section_trace, "attach": section_attach}


# ------------------------------------------------------------------ main


def print_table(rows: list[Row]) -> None:
    for r in rows:
        mark = "ok  " if r.ok else "FAIL"
        vals = "  ".join(f"{k}={v}" for k, v in r.values.items())
        print(f"[{mark}] {r.section:<7} {r.name:<20} {vals}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {list(SECTIONS)}")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--device", default="cuda", help="cuda (default); 'cpu' is a dry run of the script itself")
    ap.add_argument("--demo", action="store_true", help="the small demo model instead of full-size SwinT-OGC")
    args = ap.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to check (run it on a machine with a GPU).")
        return 0
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from nanscope.stacks.groundingdino.stack import build_model
    from nanscope.stacks.tiny_text import write_tiny_text_encoder

    tmp = Path(tempfile.mkdtemp(prefix="nanscope-gpu-"))
    te = write_tiny_text_encoder(tmp / "text_encoder")
    device = torch.device("cpu") if args.device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    config = None
    if args.demo:
        from nanscope.stacks.groundingdino.demo import write_demo

        config = write_demo(tmp / "demo", long=False).config

    def make_model() -> torch.nn.Module:
        model, _ = build_model(config, text_encoder=te, seed=0)
        return model.to(device)

    setup = Setup(device, args.batch, args.size, args.steps, tmp, te, make_model, config=config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU dry run"
    print(f"gpu_check: {name}, torch {torch.__version__}, {'demo' if args.demo else 'SwinT-OGC'} (random weights), "
          f"batch {args.batch} at {args.size} px, {args.steps} timed steps per variant")
    t0 = time.perf_counter()
    rows: list[Row] = []
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if name not in SECTIONS:
            print(f"gpu_check: unknown section {name!r}; valid: {', '.join(SECTIONS)}")
            return 2
        rows += SECTIONS[name](setup)
    print_table(rows)
    print(f"gpu_check: {sum(r.ok for r in rows)}/{len(rows)} ok in {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
