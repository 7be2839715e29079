"""nanscope.watch: the sentinel fires at the planted step, dumps a replayable step, counts AMP skips, cleans up."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from nanscope.errors import InputError
from nanscope.watch.ranks import merge_rank_dumps
from nanscope.watch.snapshot import capture_rng, portable_rng, read_manifest, restore_rng, schema_batch
from nanscope.watch.sentinel import NonFiniteStepError, watch

# ------------------------------------------------------------------ helpers


def masked_loss(out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A healthy GroundingDINO loss: focal on valid text positions only, L1 on the first queries.

    Padded positions are `-inf`; they are replaced *before* the loss and weighted out after it, so the
    loss is finite unless the model itself produced NaN/inf (NaN != -inf, so a NaN stays in).
    """
    logits = out["pred_logits"]  # [B, 900, 256]
    valid = logits != float("-inf")
    safe = torch.where(valid, logits, torch.zeros((), dtype=logits.dtype))
    n = max(sum(len(t["boxes"]) for t in batch["targets"]), 1)
    loss_ce = (sigmoid_focal_loss(safe, torch.zeros_like(safe), reduction="none") * valid).sum() / n
    boxes = out["pred_boxes"]  # [B, 900, 4]
    loss_bbox = sum((boxes[i, : len(t["boxes"])] - t["boxes"]).abs().sum() for i, t in enumerate(batch["targets"])) / n
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from nanscope.stacks.groundingdino.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo"), long=False)


def build_demo(demo: Any) -> nn.Module:
    from nanscope.stacks.groundingdino.stack import build_model

    model, _ = build_model(demo.config, text_encoder=demo.text_encoder, seed=0)
    return model


def demo_step_batch(step: int) -> dict[str, Any]:
    from nanscope.stacks.groundingdino.demo import demo_batch

    b = demo_batch(step, long=False)
    b["images"] = b["images"][:1]
    b["captions"] = b["captions"][:1]
    b["targets"] = b["targets"][:1]
    b["image_ids"] = torch.tensor([step])  # an extra key the dump must drop
    return b


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp_batch(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"images": torch.randn(4, 8, generator=g), "captions": ["a"] * 4}


def mlp_terms(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    y = model(batch["images"])
    return {"loss_a": y[:, 0].pow(2).mean(), "loss_b": y[:, 1].abs().mean()}


def hooks_of(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    for p in model.parameters():
        n += len(p._backward_hooks or {})
    return n


# ------------------------------------------------------------------ the planted NaN on the demo


def test_fires_at_the_planted_step_and_the_dump_replays(demo: Any, tmp_path: Path) -> None:
    model = build_demo(demo)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    k = 1
    seen: list[int] = []
    before_k: dict[str, torch.Tensor] = {}
    with pytest.raises(NonFiniteStepError) as info:
        with watch(model, tmp_path / "dumps", config=demo.config) as w:
            for step in range(5):
                batch = demo_step_batch(step)
                if step == k:
                    batch["images"][0, 1, 50, 60] = float("nan")
                    before_k = {n: v.detach().clone() for n, v in model.state_dict().items()}
                seen.append(step)
                terms = masked_loss(model(batch["images"], captions=batch["captions"]), batch)
                assert w.check(step, terms, batch)  # raises at step k
                opt.zero_grad()
                sum(terms.values()).backward()
                opt.step()
    assert seen == [0, 1]  # healthy steps passed; nothing ran after step k
    rep = info.value.report
    assert rep.step == k and rep.failed and rep.origin_ranks == (0,)
    assert "loss_bbox" in rep.nonfinite_terms
    assert [f.code for f in rep.findings] == ["NS001"]
    assert hooks_of(model) == 0

    dump = rep.dump
    assert dump == tmp_path / "dumps" / f"step{k:08d}-rank0"
    assert sorted(p.name for p in dump.iterdir()) == ["batch.pt", "checkpoint.pth", "manifest.json", "rng.pt"]
    manifest = json.loads((dump / "manifest.json").read_text())
    assert manifest["step"] == k and manifest["rank"] == 0 and manifest["origin"] is True
    assert manifest["loss_terms"]["loss_bbox"] == "nan"
    assert manifest["config"] == str(Path(demo.config).resolve())
    assert manifest["text_encoder"] == str(Path(demo.text_encoder).resolve())
    assert manifest["weights_step"] == k and manifest["batch_step"] == k
    assert any("image_ids" in n for n in manifest["notes"])

    ckpt = torch.load(dump / "checkpoint.pth", weights_only=True)
    assert set(ckpt) == {"model"} and set(ckpt["model"]) == set(before_k)
    for name, v in before_k.items():  # the weights as they were before step k, not after it
        assert torch.equal(ckpt["model"][name], v), name
    batch = torch.load(dump / "batch.pt", weights_only=True)
    assert set(batch) == {"images", "captions", "targets"}
    torch.load(dump / "rng.pt", weights_only=True)

    # replay: a fresh model, the dumped weights and batch -> the same term is non-finite
    fresh = build_demo(demo)
    fresh.load_state_dict(ckpt["model"])
    fresh.train()
    with torch.no_grad():
        replay = masked_loss(fresh(batch["images"], captions=batch["captions"]), batch)
    assert not math.isfinite(replay["loss_bbox"].item())
    clean = demo_step_batch(k)  # the same weights on the clean batch are finite: the image was the cause
    with torch.no_grad():
        terms = masked_loss(fresh(clean["images"], captions=clean["captions"]), clean)
    assert all(math.isfinite(v.item()) for v in terms.values())


# ------------------------------------------------------------------ reads that come late


def test_late_read_still_dumps_the_weights_from_before_the_bad_step(tmp_path: Path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    k = 3
    before_k: dict[str, torch.Tensor] = {}
    stopped_at = None
    with watch(model, tmp_path, sync_every=3, on_nonfinite="stop") as w:
        for step in range(10):
            batch = mlp_batch(step)
            if step == k:  # a weight scaled out of range: the loss overflows from step k on
                with torch.no_grad():
                    model.net[0].weight[3].mul_(1e38)
                before_k = {n: v.detach().clone() for n, v in model.state_dict().items()}
            terms = mlp_terms(model, batch)
            if not w.check(step, terms, batch):
                stopped_at = step
                break
            opt.zero_grad()
            sum(terms.values()).backward()
            opt.step()
    assert stopped_at == 5  # read every 3 checks: steps 2, 5, ...
    rep = w.report
    assert rep.step == k and rep.reason == "nonfinite_loss"
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # the live weights are gone
    ckpt = torch.load(rep.dump / "checkpoint.pth", weights_only=True)["model"]
    for name, v in before_k.items():
        assert torch.equal(ckpt[name], v), name
    assert not torch.isfinite(ckpt["net.0.weight"]).all() or ckpt["net.0.weight"].abs().max() > 1e37
    dumped = torch.load(rep.dump / "batch.pt", weights_only=True)
    assert torch.equal(dumped["images"], mlp_batch(k)["images"])
    assert read_manifest(rep.dump)["weights_step"] == k
    fresh = MLP()  # replay: the dumped weights on the dumped batch overflow again
    fresh.load_state_dict(ckpt)
    assert not math.isfinite(sum(mlp_terms(fresh, dumped).values()).item())


def test_python_float_terms_and_grad_norm_without_scaler(tmp_path: Path) -> None:
    model = MLP()
    with watch(model, tmp_path, on_nonfinite="stop") as w:
        terms = mlp_terms(model, mlp_batch(0))
        assert w.check(0, {**terms, "class_error": 3.0})
        sum(terms.values()).backward()
        model.net[0].weight.grad[0, 0] = float("nan")
        assert not w.check(1, {"loss": 1.0}, grad_norm=True)
    assert w.report.reason == "nonfinite_grad"
    assert w.report.findings[0].where[0]["term"] == "grad_norm"


# ------------------------------------------------------------------ AMP


def test_nonfinite_loss_under_bf16_autocast_is_a_failure_even_with_a_scaler(tmp_path: Path) -> None:
    model = MLP()
    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(NonFiniteStepError) as info, watch(model, tmp_path, scaler=scaler) as w:
        for step in range(4):
            batch = mlp_batch(step)
            if step == 2:
                batch["images"][0, 0] = float("nan")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                terms = mlp_terms(model, batch)
            assert terms["loss_a"].dtype == torch.float32 or terms["loss_a"].dtype == torch.bfloat16
            w.check(step, terms, batch)
            opt.zero_grad()
            scaler.scale(sum(terms.values())).backward()
            scaler.step(opt)
            scaler.update()
    rep = info.value.report
    assert rep.step == 2 and rep.reason == "nonfinite_loss" and rep.overflow_skips == 0
    assert read_manifest(rep.dump)["amp"]["autocast"] == {"cpu": "bfloat16"}
    assert read_manifest(rep.dump)["scaler"]["scale"] == 65536.0


def _scaler_loop(model: nn.Module, w: Any, scaler: Any, steps: int, bad: set[int] | Any) -> list[int]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    done = []
    for step in range(steps):
        batch = mlp_batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = mlp_terms(model, batch)
        if not w.check(step, terms, batch):
            break
        opt.zero_grad()
        scaler.scale(sum(terms.values())).backward()
        if step in bad:
            model.net[2].weight.grad[0, 0] = float("inf")  # an fp16-style overflow in the gradients
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        done.append(step)
    return done


def test_scaler_overflow_skips_are_counted_not_failures(tmp_path: Path) -> None:
    model = MLP()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with watch(model, tmp_path, scaler=scaler) as w:
        done = _scaler_loop(model, w, scaler, 8, {2, 5, 6})
    rep = w.report
    assert done == list(range(8))
    assert not rep.failed and rep.findings == ()
    assert rep.overflow_skips == 3 and rep.overflow_steps == (2, 5, 6)  # step 6 read at close()
    assert rep.last_scale == 1024.0 / 8
    assert not any(tmp_path.iterdir())  # no dump for a healthy run


def test_a_collapsing_scale_is_ns307(tmp_path: Path) -> None:
    model = MLP()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with watch(model, tmp_path, scaler=scaler, max_consecutive_skips=4, on_nonfinite="stop") as w:
        done = _scaler_loop(model, w, scaler, 20, range(3, 100))
    rep = w.report
    assert rep.failed and rep.reason == "scale_collapse"
    assert rep.step == 7 and done == [0, 1, 2, 3, 4, 5, 6]  # skips at 3, 4, 5, 6: the 4th shows at step 7
    assert rep.overflow_steps == (3, 4, 5, 6)
    assert [f.code for f in rep.findings] == ["NS307"]
    assert (rep.dump / "checkpoint.pth").is_file()


class FakeScaler:
    """A GradScaler-like object: only get_scale()."""

    def __init__(self, scales: list[float]) -> None:
        self.scales = scales
        self.i = 0

    def get_scale(self) -> float:
        return self.scales[min(self.i, len(self.scales) - 1)]


def test_scale_below_min_scale_is_ns307_with_a_scaler_like_object(tmp_path: Path) -> None:
    model = MLP()
    scaler = FakeScaler([8.0, 4.0, 8.0, 2.0, 0.5])
    with watch(model, tmp_path, scaler=scaler, on_nonfinite="stop") as w:
        ok = []
        for step in range(5):
            scaler.i = step
            ok.append(w.check(step, mlp_terms(model, mlp_batch(step))))
    assert ok == [True, True, True, True, False]
    assert w.report.reason == "scale_collapse" and w.report.step == 4
    assert w.report.overflow_steps == (0, 2, 3)


# ------------------------------------------------------------------ cleanup


def test_context_manager_leaves_no_hooks_when_the_loop_raises(tmp_path: Path) -> None:
    model = MLP()
    hooks = hooks_of(model)
    with pytest.raises(RuntimeError, match="data loader broke"):
        with watch(model, tmp_path, sync_every=2) as w:
            for step in range(3):
                w.check(step, mlp_terms(model, mlp_batch(step)), mlp_batch(step))
                assert hooks_of(model) == hooks + 1  # the forward pre-hook that records RNG states
            raise RuntimeError("data loader broke")
    assert hooks_of(model) == hooks
    assert w._snapshot is None and w._records == []
    with pytest.raises(InputError, match="closed watcher"):
        w.check(4, mlp_terms(model, mlp_batch(4)))
    with watch(model, tmp_path) as again:  # a second watcher starts from scratch
        again.check(0, mlp_terms(model, mlp_batch(0)))
    assert hooks_of(model) == hooks
    assert not any(tmp_path.iterdir())


def test_bad_arguments_name_what_was_expected(tmp_path: Path) -> None:
    model = MLP()
    with pytest.raises(InputError, match="got a function; expected the torch.nn.Module"):
        watch(mlp_terms, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="on_nonfinite='ignore'"):
        watch(model, tmp_path, on_nonfinite="ignore")  # type: ignore[arg-type]
    with watch(model, tmp_path) as w:
        with pytest.raises(InputError, match="empty loss_dict"):
            w.check(0, {})
        with pytest.raises(InputError, match="'loss_x' is a str"):
            w.check(0, {"loss_x": "nan"})  # type: ignore[dict-item]
    assert hooks_of(model) == 0


# ------------------------------------------------------------------ dump pieces


def test_schema_batch_keeps_the_schema_and_drops_the_rest() -> None:
    batch = {
        "images": [torch.ones(3, 4, 5), torch.ones(3, 6, 5)],
        "captions": ("cat .", "dog ."),
        "targets": [{"boxes": torch.rand(1, 4), "phrases": ["cat"], "labels": torch.tensor([0])},
                    {"boxes": torch.rand(1, 4), "tokens_positive": [[(0, 3)]]}],
        "image_ids": torch.tensor([1, 2]),
    }
    out, notes = schema_batch(batch)
    assert set(out) == {"images", "captions", "targets", "image_masks"}  # the padding is marked
    assert out["images"].shape == (2, 3, 6, 5) and out["images"][0, :, 4:].sum() == 0
    assert out["captions"] == ["cat .", "dog ."]
    assert set(out["targets"][0]) == {"boxes", "phrases", "extra"} and out["targets"][1]["tokens_positive"] == [[[0, 3]]]
    assert torch.equal(out["targets"][0]["extra"]["labels"], torch.tensor([0]))  # the trainer's own key, kept
    assert any("image_ids" in n for n in notes) and any("labels" in n and "extra" in n for n in notes)
    assert any("zero-padded" in n for n in notes)

    class Nested:  # groundingdino's NestedTensor: padded images and a mask
        tensors = torch.zeros(1, 3, 4, 4)

    pair = (Nested(), [{"boxes": torch.rand(1, 4), "caption": "cat .", "tokens_positive": [[[0, 3]]]}])
    out, notes = schema_batch(pair)  # a DETR-style (samples, targets) pair, captions from the targets
    assert out["images"].shape == (1, 3, 4, 4) and out["captions"] == ["cat ."]
    assert set(out["targets"][0]) == {"boxes", "tokens_positive"} and torch.equal(out["targets"][0]["boxes"],
                                                                                 pair[1][0]["boxes"])
    assert "image_masks" not in out  # this NestedTensor-like object has no mask to keep


def test_rng_states_survive_a_weights_only_round_trip(tmp_path: Path) -> None:
    import numpy as np

    state = capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.save(portable_rng(state), tmp_path / "rng.pt")
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


# ------------------------------------------------------------------ CUDA: no syncs of its own, late reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_check_never_syncs_and_a_late_read_names_the_planted_step(tmp_path: Path) -> None:
    dev = torch.device("cuda")
    model = MLP().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    k = 4
    before_k: dict[str, torch.Tensor] = {}
    stopped_at = None
    with watch(model, tmp_path, on_nonfinite="stop") as w:
        for step in range(8):
            batch = {"images": mlp_batch(step)["images"].to(dev), "captions": ["a"] * 4}
            if step == k:
                batch["images"][0, 0] = float("nan")
                before_k = {n: v.detach().cpu().clone() for n, v in model.state_dict().items()}
                torch.cuda._sleep(200_000_000)  # keep the GPU busy: step k's flag cannot be read at check k
            terms = mlp_terms(model, batch)
            torch.cuda.set_sync_debug_mode("error")
            try:
                ok = w.check(step, terms, batch, grad_norm=None)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            if not ok:
                stopped_at = step
                break
            opt.zero_grad()
            sum(terms.values()).backward()
            opt.step()
        w.poll()
    rep = w.report
    assert rep.failed and rep.step == k
    assert stopped_at is None or stopped_at > k  # read late: after optimizer.step() of step k ran
    assert w.weight_copy_bytes == 0  # released after the dump
    ckpt = torch.load(rep.dump / "checkpoint.pth", weights_only=True)["model"]
    assert all(torch.equal(ckpt[n], v) for n, v in before_k.items())
    assert read_manifest(rep.dump)["device"] == "cuda"


def test_nanscope_watch_is_callable_even_after_the_module_was_imported(tmp_path: Path) -> None:
    import nanscope
    import nanscope.watch  # binds the package attribute `watch` to the module

    model = MLP()
    with nanscope.watch(model, tmp_path, on_nonfinite="stop") as w:  # the spelling still works
        assert w.check(0, mlp_terms(model, mlp_batch(0)))
    assert hooks_of(model) == 0


def test_without_a_batch_the_dump_keeps_the_model_inputs(tmp_path: Path) -> None:
    model = MLP()
    x = mlp_batch(0)["images"]
    x[1, 1] = float("nan")
    with watch(model, tmp_path, on_nonfinite="stop") as w:
        assert not w.check(0, mlp_terms(model, {"images": x}))  # no batch given to check()
    dumped = torch.load(w.report.dump / "batch.pt", weights_only=True)
    assert torch.allclose(dumped["images"], x, equal_nan=True)
    assert any("targets are missing" in n for n in read_manifest(w.report.dump)["notes"])


# ------------------------------------------------------------------ a criterion that raises before check()


def test_a_matcher_that_raises_still_leaves_a_dump_that_inspect_explains(demo: Any, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from nanscope.replay.batch import validate_batch
    from nanscope.stacks.capture import capture
    from nanscope.cli import main
    from nanscope.criterion.set_criterion import SetCriterion
    from nanscope.errors import MatchingError
    from nanscope.stacks.groundingdino.demo import demo_batch
    from nanscope.replay.positive_map import build_text_info

    model = build_demo(demo)
    model.train()
    criterion = SetCriterion()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    k = 1
    before_k: dict[str, torch.Tensor] = {}
    seen: list[int] = []
    with pytest.raises(MatchingError) as info, pytest.warns(RuntimeWarning, match="dumped to"):
        with watch(model, tmp_path / "dumps", criterion=criterion, config=demo.config) as w:
            for step in range(3):
                raw = demo_batch(step, long=False)
                if step == k:
                    raw["images"][1, 2, 10, 20] = float("nan")  # every logit and box of image 1 turns NaN
                    before_k = {n: v.detach().clone() for n, v in model.state_dict().items()}
                b = validate_batch(raw)
                targets = [{"boxes": t.boxes, "positive_map": ti.positive_map}
                           for t, ti in zip(b.targets, build_text_info(model.tokenizer, b))]
                seen.append(step)
                with capture(model, detach=False) as cap:
                    model(b.images, captions=list(b.captions))
                terms = criterion(cap.last.to_outputs(), targets)  # the matcher raises at step k
                w.check(step, terms, raw)
                opt.zero_grad()
                criterion.total(terms).backward()
                opt.step()
    assert seen == [0, 1] and type(info.value) is MatchingError  # propagated as raised, not wrapped
    assert hooks_of(model) == 0 and w._snapshot is None and w._records == []

    rep = w.report
    dump = tmp_path / "dumps" / f"step{k:08d}-rank0"
    assert rep.failed and rep.reason == "exception" and rep.step == k and rep.dump == dump
    assert [f.code for f in rep.findings] == ["NS203"]  # the matcher refused NaN costs
    manifest = read_manifest(dump)
    assert manifest["reason"] == "exception" and manifest["step"] == k and manifest["batch_step"] == k
    assert manifest["exception"] == {"type": "MatchingError", "module": "nanscope.errors",
                                     "message": str(info.value)}
    assert manifest["criterion"] == "nanscope.criterion.set_criterion:SetCriterion" and manifest["weights_step"] == k
    ckpt = torch.load(dump / "checkpoint.pth", weights_only=True)["model"]
    for name, v in before_k.items():  # the weights the failing step started from
        assert torch.equal(ckpt[name], v), name
    dumped = torch.load(dump / "batch.pt", weights_only=True)
    assert torch.isnan(dumped["images"][1, 2, 10, 20]) and dumped["captions"] == demo_batch(k, long=False)["captions"]

    out = tmp_path / "r.json"
    code = main(["inspect", str(dump), "--criterion", "nanscope.criterion:SetCriterion", "--json", str(out)])
    capsys.readouterr()
    assert code == 1
    findings = json.loads(out.read_text())["findings"]
    assert findings[0]["code"] == "NS304"  # the cause: a non-finite pixel in image 1, channel 2
    assert {"image": 1, "channel": 2}.items() <= findings[0]["where"][0].items()


def test_an_exception_dumps_the_step_the_model_ran_for_and_only_that(tmp_path: Path) -> None:
    model = MLP()
    with pytest.raises(ValueError, match="matrix contains invalid numeric entries"), pytest.warns(RuntimeWarning):
        with watch(model, tmp_path / "a", sync_every=2, keep_weights=True) as w:
            for step in range(3):
                terms = mlp_terms(model, mlp_batch(step))
                if step == 2:  # what scipy's linear_sum_assignment raises in a user's own matcher
                    raise ValueError("matrix contains invalid numeric entries")
                w.check(step, terms, mlp_batch(step))
    assert hooks_of(model) == 0
    manifest = read_manifest(w.report.dump)
    assert manifest["step"] == 2 and manifest["reason"] == "exception" and manifest["exception"]["type"] == "ValueError"
    assert [f.code for f in w.report.findings] == ["NS203"]
    merged = merge_rank_dumps(tmp_path / "a")  # what `nanscope report` reads
    assert merged["origin_ranks"] == [0] and merged["reason"] == "exception" and not merged["problems"]
    assert torch.equal(torch.load(w.report.dump / "batch.pt", weights_only=True)["images"], mlp_batch(2)["images"])

    # no dump: Ctrl-C, an error before the model ran for the step, the sentinel's own error
    with pytest.raises(KeyboardInterrupt), watch(model, tmp_path / "b") as w:
        mlp_terms(model, mlp_batch(0))
        raise KeyboardInterrupt
    with pytest.raises(RuntimeError), watch(model, tmp_path / "c") as w:
        w.check(0, mlp_terms(model, mlp_batch(0)))
        raise RuntimeError("data loader broke")
    with pytest.raises(InputError), watch(model, tmp_path / "d") as w:
        mlp_terms(model, mlp_batch(0))
        w.check(0, {})
    assert not any((tmp_path / d).exists() for d in "bcd")
    assert hooks_of(model) == 0


def test_an_unread_bad_step_is_dumped_before_a_later_exception(tmp_path: Path) -> None:
    model = MLP()
    with pytest.raises(RuntimeError, match="later"), pytest.warns(RuntimeWarning):
        with watch(model, tmp_path, sync_every=5) as w:
            for step in range(4):
                batch = mlp_batch(step)
                if step == 1:
                    batch["images"][0, 0] = float("nan")
                terms = mlp_terms(model, batch)
                if step == 3:
                    raise RuntimeError("a later step raised")
                w.check(step, terms, batch)  # read every 5 checks: step 1 is still unread at step 3
    manifest = read_manifest(w.report.dump)
    assert manifest["step"] == 1 and manifest["reason"] == "nonfinite_loss" and manifest["exception"] is None
    assert any("a later step raised" in n for n in manifest["notes"])


def test_nested_tensor_padding_mask_is_kept_in_the_dump_batch() -> None:
    from groundingdino.util.misc import nested_tensor_from_tensor_list

    from nanscope.replay.batch import validate_batch
    from nanscope.watch.snapshot import schema_batch

    imgs = [torch.randn(3, 8, 6), torch.randn(3, 5, 6)]
    nested = nested_tensor_from_tensor_list(imgs)  # groundingdino pads and masks (True on padding)
    targets = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}]
    out, _notes = schema_batch({"images": nested, "captions": ["cat .", "dog ."], "targets": targets})
    assert torch.equal(out["image_masks"], nested.mask)
    assert int(out["image_masks"][1].sum()) == 3 * 6  # rows 5..7 of the smaller image are padding
    listed, notes = schema_batch({"images": imgs, "captions": ["cat .", "dog ."], "targets": targets})
    assert torch.equal(listed["image_masks"], nested.mask) and torch.equal(listed["images"], nested.tensors)
    assert validate_batch(out).image_masks is not None  # the dump's batch loads with its mask
