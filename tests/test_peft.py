"""PEFT (LoRA) on the real demo GroundingDINO: every file layout a trainer writes replays to the live model.

The live PEFT model is the reference: its outputs on the healthy batch are compared with the replay of each
file (logits and boxes to 1e-5), with the LoRA B weights set non-zero so that the adapter changes the output.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")

from nanscope.errors import CheckpointError
from nanscope.replay.session import prepare
from nanscope.stacks.groundingdino_py import build_model

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
    with pytest.raises(CheckpointError, match=r"only the trainable weights.*base checkpoint.*--adapter"):
        prepare(live["trainable"], fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
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
