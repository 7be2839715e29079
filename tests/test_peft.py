"""PEFT (LoRA) on the real demo GroundingDINO: every file layout a trainer writes replays to the live model.

The live PEFT model is the reference: its outputs on the healthy batch are compared with the replay of each
file (logits and boxes to 1e-5), with the LoRA B weights set non-zero so that the adapter changes the output.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from nanscope.errors import CheckpointError
from nanscope.replay.session import prepare
from nanscope.stacks.groundingdino.stack import build_model

TARGETS = ["value_proj", "linear1", "linear2", "sampling_offsets"]
R, ALPHA = 4, 16  # scaling 4: not peft's default lora_alpha=8, so an assumed alpha shows in the outputs


def _peft_model(demo_files, *, targets=TARGETS, modules_to_save=("feat_map",), seed=1):
    model, _ = build_model(demo_files.config, text_encoder=demo_files.text_encoder, seed=0)
    model.load_state_dict(torch.load(demo_files.checkpoint, weights_only=True)["model"])
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets),
                          modules_to_save=list(modules_to_save) or None)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:  # as after some training steps
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return pm.eval()


@pytest.fixture(scope="module")
def live(demo_files, fixture_files, tmp_path_factory):
    """The live PEFT model, its outputs on the healthy batch, and the files a trainer writes from it."""
    pm = _peft_model(demo_files)
    out = tmp_path_factory.mktemp("peft")
    full = out / "full" / "checkpoint.pth"
    full.parent.mkdir()
    torch.save({"model": pm.state_dict()}, full)
    pm.peft_config["default"].save_pretrained(str(full.parent))  # adapter_config.json next to the weights
    bare = out / "bare.pth"  # the same state dict with no adapter_config.json anywhere near it
    torch.save(pm.state_dict(), bare)
    pm.save_pretrained(str(out / "adapter"))
    trainable = out / "trainable" / "trainable.pth"
    trainable.parent.mkdir()
    keep = {n for n, p in pm.named_parameters() if p.requires_grad}
    torch.save({"model": {k: v for k, v in pm.state_dict().items() if k in keep}}, trainable)
    pm.peft_config["default"].save_pretrained(str(trainable.parent))
    replay = prepare(demo_files.checkpoint, fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
    with torch.no_grad():
        ref = replay.run(pm)
        plain = replay.run()
    return {"model": pm, "ref": ref, "plain": plain, "full": full, "bare": bare, "adapter": out / "adapter",
            "trainable": trainable, "keep": keep}


def _outputs(demo_files, batch, checkpoint, **kw):
    replay = prepare(checkpoint, batch, config=demo_files.config, hash_checkpoint=False, **kw)
    with torch.no_grad():
        return replay, replay.run()


def _close(a, b, tol=1e-5, rtol=0.0):
    return all(torch.allclose(a[k], b[k], atol=tol, rtol=rtol) for k in ("pred_logits", "pred_boxes"))


def test_the_adapter_matters(live):
    assert not _close(live["ref"], live["plain"], 1e-3)


def test_full_state_dict_replays_unmerged_through_peft(demo_files, fixture_files, live):
    replay, out = _outputs(demo_files, fixture_files.healthy, live["full"])
    fit = replay.key_fit
    assert fit.clean, (fit.missing[:3], fit.unexpected[:3])
    assert fit.adapter.r == R and fit.adapter.lora_alpha == ALPHA and not fit.adapter.alpha_assumed
    assert len(fit.adapter.targets) == sum(1 for n, m in live["model"].named_modules()
                                           if isinstance(m, peft.tuners.lora.LoraLayer))
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in replay.model.modules())  # unmerged
    assert _close(out, live["ref"])


def test_merge_lora_replays_a_plain_model_with_the_same_outputs(demo_files, fixture_files, live):
    replay, out = _outputs(demo_files, fixture_files.healthy, live["full"], merge_lora=True)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in replay.model.modules())
    # The reference is PEFT's own merge of the live model. W + B @ A * scaling rounds differently from the two
    # matmuls of the unmerged forward, and the encoder's top-k proposal selection turns that into different
    # queries: which is why the default replay is unmerged, as training ran.
    with torch.no_grad():
        merged = replay.run(copy.deepcopy(live["model"]).merge_and_unload())
    assert replay.key_fit.adapter.merged and _close(out, merged)
    same = (out["pred_boxes"] - live["ref"]["pred_boxes"]).abs().amax(-1) < 1e-3  # [B, Q]
    assert same.float().mean() > 0.5 and not _close(out, live["plain"], 1e-2)


def test_adapter_folder_with_the_base_checkpoint(demo_files, fixture_files, live, tmp_path):
    replay, out = _outputs(demo_files, fixture_files.healthy, demo_files.checkpoint, adapter=live["adapter"])
    assert replay.key_fit.clean and _close(out, live["ref"])
    # The folder alone: its base_model_name_or_path names the base checkpoint...
    folder = tmp_path / "adapter"
    folder.mkdir()
    for f in live["adapter"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": None}))
    with pytest.raises(CheckpointError, match="--adapter"):  # ...and without it the message says what to pass
        prepare(folder, fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(demo_files.checkpoint)}))
    _, out2 = _outputs(demo_files, fixture_files.healthy, folder)
    assert _close(out2, live["ref"])


def test_trainable_only_file_names_the_base_checkpoint_it_needs(demo_files, fixture_files, live):
    cfg_file = live["trainable"].parent / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "base_model_name_or_path": "runs/base/checkpoint0011.pth"}))
    with pytest.raises(CheckpointError, match=r"only the trainable weights.*base checkpoint.*checkpoint0011.pth.*--adapter"):
        prepare(live["trainable"], fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
    cfg_file.write_text(json.dumps(cfg))
    replay, out = _outputs(demo_files, fixture_files.healthy, demo_files.checkpoint, adapter=live["trainable"])
    assert replay.key_fit.clean and _close(out, live["ref"])


def test_missing_adapter_config_assumes_peft_default_alpha_ns309(demo_files, fixture_files, live):
    from types import SimpleNamespace

    from nanscope.analyzers.checkpoint_fit import lora_alpha_assumed

    replay, out = _outputs(demo_files, fixture_files.healthy, live["bare"])
    info = replay.key_fit.adapter
    assert info.alpha_assumed and info.lora_alpha == 8 and info.r == R
    assert not _close(out, live["ref"], 1e-4)  # the real alpha (16) is not in the file: the replay differs
    (f,) = lora_alpha_assumed(SimpleNamespace(key_fit=replay.key_fit))
    assert f.code == "NS309" and "lora_alpha=8" in f.message


def _masked_criterion():
    import importlib.util

    path = Path(__file__).parents[1] / "fixtures" / "criteria" / "simple.py"
    spec = importlib.util.spec_from_file_location("nanscope_test_criteria_peft", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.masked


def test_watched_peft_loop_dumps_and_replays_exactly(demo_files, fixture_files, tmp_path, capsys):
    import nanscope
    from nanscope.cli import main
    from nanscope.replay.batch import validate_batch
    from nanscope.replay.positive_map import build_text_info
    from nanscope.stacks.groundingdino.demo import demo_batch
    from nanscope.watch.report import NonFiniteStepError

    pm = _peft_model(demo_files, seed=2)
    det = pm.get_base_model()
    criterion = _masked_criterion()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(NonFiniteStepError) as info, \
            nanscope.watch(pm, tmp_path / "dumps", config=demo_files.config, text_encoder=demo_files.text_encoder) as w:
        for step in range(2):
            raw = demo_batch(step, long=False)
            if step == 1:
                raw["images"][0, 1, 5, 7] = float("nan")
            b = validate_batch(raw)
            texts = build_text_info(det.tokenizer, b)
            targets = [{"boxes": t.boxes, "positive_map": ti.positive_map} for t, ti in zip(b.targets, texts)]
            with nanscope.capture(pm, detach=False) as cap:
                pm(b.images, captions=list(b.captions))
            terms = criterion(cap.last.to_outputs(), targets)
            w.check(step, terms, raw)
            opt.zero_grad()
            sum(terms.values()).backward()
            opt.step()  # the LoRA weights move: the dump must hold step 1's, not the initial ones
    dump = Path(info.value.report.dump)
    assert (dump / "adapter_config.json").is_file()
    replay = prepare(dump / "checkpoint.pth", fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
    assert replay.key_fit.clean and replay.key_fit.adapter.lora_alpha == ALPHA and not replay.key_fit.adapter.alpha_assumed
    pm.eval()
    with torch.no_grad():
        assert _close(replay.run(), replay.run(pm))  # the weights of the bad step, through the same LoRA layers
    out = tmp_path / "r.json"
    assert main(["inspect", str(dump), "--json", str(out)]) == 1
    capsys.readouterr()
    codes = {f["code"]: f for f in json.loads(out.read_text())["findings"]}
    assert codes["NS304"]["severity"] == "error"
    assert "NS306" not in codes or codes["NS306"]["severity"] == "info"


def test_lora_on_multihead_attention_out_proj_never_trains_ns308(demo_files, fixture_files):
    from types import SimpleNamespace

    from nanscope.analyzers.checkpoint_fit import lora_never_trains

    pm = _peft_model(demo_files, targets=["out_proj", "linear1"], modules_to_save=())
    mha = sorted(n for n, m in pm.get_base_model().named_modules() if isinstance(m, torch.nn.MultiheadAttention))
    assert mha == ["transformer.decoder.layers.0.ca_text", "transformer.decoder.layers.0.self_attn",
                   "transformer.encoder.text_layers.0.self_attn"]
    pm.train()
    replay = prepare(demo_files.checkpoint, fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
    out = replay.run(pm)
    lg = out["pred_logits"]
    (lg[lg.isfinite()].sigmoid().sum() + out["pred_boxes"].sum()).backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if ".lora_B." in n}
    dead = sorted(n.removeprefix("base_model.model.").split(".out_proj.")[0] for n, g in grads.items()
                  if ".out_proj." in n and (g is None or not g.abs().sum()))
    assert dead == mha  # every out_proj LoRA measured without gradient
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".linear1." in n)  # control
    (f,) = lora_never_trains(SimpleNamespace(model=pm.get_base_model()))
    assert f.code == "NS308" and f.severity.value == "warning"
    assert sorted(m.removesuffix(".out_proj") for m in f.data["modules"]) == mha


def test_cli_inspect_with_adapter_folder_reports_ns308(demo_files, fixture_files, tmp_path, capsys):
    from nanscope.cli import main

    pm = _peft_model(demo_files, targets=["out_proj", "linear1"], modules_to_save=())
    pm.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "r.json"
    code = main(["inspect", str(demo_files.checkpoint), str(fixture_files.healthy), "--config", str(demo_files.config),
                 "--adapter", str(tmp_path / "adapter"), "--json", str(out)])
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert code == 0, [f["code"] for f in result["findings"]]
    codes = {f["code"]: f for f in result["findings"]}
    assert codes["NS308"]["count"] == 3 and codes["NS308"]["severity"] == "warning"
    assert "NS309" not in codes  # the folder's adapter_config.json gives lora_alpha
    assert codes["NS306"]["severity"] == "info" and "unmerged" in codes["NS306"]["message"]
    assert result["inputs"]["lora"].startswith("unmerged") and result["inputs"]["adapter"] == str(tmp_path / "adapter")


def test_trainable_only_file_with_an_unfrozen_tied_head(demo_files, fixture_files, tmp_path):
    """A trainer that also unfroze the box head saves it under one of its two tied names (named_parameters
    lists a tied parameter once); the other name in the base checkpoint still holds the old values."""
    pm = _peft_model(demo_files, modules_to_save=(), seed=3)
    head = pm.get_base_model().bbox_embed[0]
    with torch.no_grad():
        for p in head.parameters():
            p.requires_grad_(True)
            p.add_(0.05)
    keep = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert sum(".bbox_embed.0." in n for n in keep) == 6  # the head's 6 tensors, under one name each
    path = tmp_path / "trainable.pth"
    torch.save({k: v for k, v in pm.state_dict().items() if k in keep}, path)
    pm.peft_config["default"].save_pretrained(str(tmp_path))
    replay, out = _outputs(demo_files, fixture_files.healthy, demo_files.checkpoint, adapter=path)
    assert replay.key_fit.clean  # no tied parameters with two values
    with torch.no_grad():
        assert _close(out, replay.run(pm.eval()))


def test_live_config_of_layers_injected_without_a_peft_model():
    from nanscope.stacks.formats.peft import live_adapter_config

    net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"], use_rslora=True), net)
    cfg = live_adapter_config(net)
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["target_modules"]) == (2, 6.0, True, ["0", "2"])
    plain = torch.nn.Sequential(torch.nn.Linear(6, 6))
    assert live_adapter_config(plain) is None
