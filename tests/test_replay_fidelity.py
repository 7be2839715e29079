"""How faithfully a replay reproduces training: --train-mode with a dump's RNG (dropout/drop-path masks),
the fp32 warning for activations beyond the fp16 range (NS303), and GIoU's assertion on NaN boxes
diagnosed as a symptom instead of stopping on "your criterion raised"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _planting import planted
from test_analyzers import small, with_batch

import nanscope
from nanscope.cli import main
from nanscope.errors import InputError
from nanscope.findings import Severity
from nanscope.replay.batch import validate_batch
from nanscope.replay.diagnose import inspect_replay
from nanscope.replay.module_stats import FP16_MAX
from nanscope.replay.positive_map import build_text_info
from nanscope.replay.session import Replay, load_rng, prepare, training_forward
from nanscope.stacks.groundingdino.stack import build_model
from nanscope.watch.report import NonFiniteStepError
from nanscope.watch.snapshot import capture_rng, portable_rng

CRITERIA = Path(__file__).parents[1] / "fixtures" / "criteria"
# The last Swin block of the demo backbone runs `x + drop_path(mlp(x))` with drop_prob 0.2, one draw per
# image. Its fc2 bias planted at 2.9e38 (finite; fp32 max 3.4e38) is harmless in eval mode (the next
# LayerNorm maps it to a finite value), but drop-path divides a kept image by 0.8: 3.6e38 -> inf -> NaN
# in every later activation of that image. A dropped image gets 0: NaN depends on the mask.
DROP_BLOCK = "backbone.0.layers.3.blocks.0"
HUGE = 2.9e38


@pytest.fixture(scope="module")
def replay(demo_files) -> Replay:
    """This module's own Replay of the demo: tests plant weights (and restore them)."""
    return prepare(demo_files.checkpoint, demo_files.batch, config=demo_files.config, hash_checkpoint=False)


def _plant_huge_bias(t: torch.Tensor) -> None:
    t[3] = HUGE


class _Seen(Exception):
    pass


def _finite(model: torch.nn.Module, raw: dict[str, Any]) -> bool:
    """Whether the planted block's output is finite; the forward stops there (the rest only spreads it)."""
    def stop(_m: Any, _i: Any, out: torch.Tensor) -> None:
        raise _Seen(bool(torch.isfinite(out).all()))

    handle = dict(model.named_modules())[DROP_BLOCK].register_forward_hook(stop)
    try:
        with torch.no_grad():
            model(raw["images"], captions=raw["captions"])
    except _Seen as seen:
        return seen.args[0]
    finally:
        handle.remove()
    raise AssertionError(f"{DROP_BLOCK} did not run")


def test_dropout_dependent_nan_reproduces_with_train_mode_and_the_dumps_rng(demo_files, tmp_path, capsys):
    """One image (groundingdino's text-image fusion takes a max over the whole batch, so a NaN in one
    image's features reaches every image): NaN iff the planted block's drop-path keeps it."""
    model, _ = build_model(demo_files.config, text_encoder=demo_files.text_encoder, seed=0)
    model.load_state_dict(torch.load(demo_files.checkpoint, weights_only=True)["model"])
    with torch.no_grad():
        _plant_huge_bias(dict(model.named_modules())[DROP_BLOCK + ".mlp.fc2"].bias)
    raw = small(n=1)
    assert _finite(model, raw)  # eval mode
    model.train()
    kept = dropped = None  # seeds whose masks keep / drop the planted path
    for seed in range(40):
        torch.manual_seed(seed)
        if _finite(model, raw):
            dropped = seed if dropped is None else dropped
        else:
            kept = seed if kept is None else kept
        if kept is not None and dropped is not None:
            break
    assert kept is not None and dropped is not None
    b = validate_batch(raw)
    texts = build_text_info(model.tokenizer, b)
    targets = [{"boxes": t.boxes, "positive_map": ti.positive_map} for t, ti in zip(b.targets, texts)]
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("nanscope_fidelity_criteria", CRITERIA / "simple.py")
    crit = module_from_spec(spec)
    spec.loader.exec_module(crit)
    dumps = tmp_path / "dumps"
    with pytest.raises(NonFiniteStepError) as info, \
            nanscope.watch(model, dumps, config=demo_files.config, text_encoder=demo_files.text_encoder) as w:
        torch.manual_seed(kept)
        with nanscope.capture(model, detach=False) as cap:
            model(b.images, captions=list(b.captions))
        w.check(0, crit.masked(cap.last.to_outputs(), targets), raw)
    dump = Path(info.value.report.dump)
    assert json.loads((dump / "manifest.json").read_text())["model"]["training"] is True

    out = tmp_path / "train.json"
    assert main(["inspect", str(dump), "--select", "NS202", "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["summary"]["mode"] == "train" and result["summary"]["rng_restored"] is True
    assert [f["code"] for f in result["findings"]] == ["NS202"]

    capsys.readouterr()

    dumped = prepare(dump / "checkpoint.pth", dump / "batch.pt", config=demo_files.config, hash_checkpoint=False)
    result = inspect_replay(dumped, select=["NS202"])  # eval mode, as replays ran before --train-mode
    assert result.summary["mode"] == "eval" and result.findings == []
    # Training mode with another step's masks (the planted path dropped): finite. The mask is the cause.
    torch.manual_seed(dropped)
    other = portable_rng(capture_rng())
    result = inspect_replay(dumped, select=["NS202"], train_mode=True, rng=other)
    assert result.findings == [] and result.summary["mode"] == "train"


def test_training_forward_keeps_no_state(replay):
    model = replay.model
    before_rng = portable_rng(capture_rng())["torch"].clone()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = portable_rng(capture_rng())
    with pytest.raises(RuntimeError), training_forward(model, rng):
        assert all(m.training for m in model.modules())
        torch.rand(3)  # moves the generator
        raise RuntimeError("boom")
    assert not any(m.training for m in model.modules())
    assert torch.equal(portable_rng(capture_rng())["torch"], before_rng)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


def test_fp32_activation_beyond_fp16_range_warns_with_module_and_magnitude(replay):
    name = "transformer.decoder.layers.0.linear1"
    module = dict(replay.model.named_modules())[name]
    seen: list[float] = []
    handle = module.register_forward_hook(lambda _m, _i, o: seen.append(float(o.detach().abs().max())))
    try:
        with planted(replay, name + ".weight", lambda t: t.mul_(2e4)):
            result = inspect_replay(with_batch(replay, small(n=1)), select=["NS303"])
    finally:
        handle.remove()
    biggest = max(seen)  # measured by our own hook on the same forward
    assert FP16_MAX < biggest < 1e30  # finite in fp32, past what fp16 holds
    (f,) = result.findings
    assert f.code == "NS303" and f.severity is Severity.WARNING
    w = next(w for w in f.where if w["module"] == name)
    assert w["max_abs"] == pytest.approx(biggest, rel=1e-3) and w["why"] == "beyond the fp16 range"
    assert "rerun with --amp fp16 to confirm" in f.message and "float32" in f.message


def test_giou_assertion_on_nan_boxes_is_diagnosed_not_a_criterion_bug(demo_files, tmp_path, capsys):
    raw = small()
    raw["images"][1, 0, 5:9, 5:9] = float("nan")  # a corrupt patch in image 1 -> NaN boxes for image 1
    batch = tmp_path / "nan_image.pt"
    torch.save(raw, batch)
    out = tmp_path / "r.json"
    code = main(["inspect", str(demo_files.checkpoint), str(batch), "--config", str(demo_files.config),
                 "--criterion", f"{CRITERIA / 'giou.py'}:giou_loss", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 1, text  # a diagnosis, not exit 2 ("your criterion raised")
    result = json.loads(out.read_text())
    codes = [f["code"] for f in result["findings"]]
    assert codes[0] == "NS304" and "NS202" in codes
    assert {w["image"] for w in result["findings"][0]["where"]} == {1}
    # groundingdino's text-image fusion takes a max over the batch: the NaN boxes reach both images.
    ns202 = next(f for f in result["findings"] if f["code"] == "NS202")
    assert 1 in {w["image"] for w in ns202["where"]}
    assert "generalized_box_iou" in (result["summary"]["criterion_error"] or "")


def test_load_rng_names_the_file_and_what_it_needs(tmp_path):
    torch.manual_seed(3)
    good = tmp_path / "rng.pt"
    torch.save({"before_forward": portable_rng(capture_rng()), "at_check": None}, good)
    assert torch.equal(load_rng(good)["torch"], torch.get_rng_state())
    bad = tmp_path / "other.pt"
    torch.save({"before_forward": None}, bad)
    with pytest.raises(InputError, match="other.pt.*before_forward"):
        load_rng(bad)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="junk.pt.*cannot be read"):
        load_rng(tmp_path / "junk.pt")
