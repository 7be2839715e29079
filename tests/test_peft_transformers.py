"""PEFT (LoRA) on the real transformers GroundingDino: a save_pretrained adapter on its base folder replays
to the live PeftModel's outputs (unmerged through PEFT's layers, or merged), found as `--adapter` or alone."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from nanscope.cli import main  # noqa: E402
from nanscope.replay.session import prepare  # noqa: E402
from nanscope.stacks.transformers.demo import write_hf_model  # noqa: E402
from nanscope.stacks.transformers.loading import load_tokenizer  # noqa: E402

TARGETS = ["q_proj", "v_proj", "query", "value", "fc1"]
R, ALPHA = 4, 16


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-peft")
    folder = write_hf_model(root / "base", num_queries=50)
    model = transformers.GroundingDinoForObjectDetection.from_pretrained(folder).eval()
    # PEFT 0.21 asks the model for get_input_embeddings, which GroundingDino does not answer: a trainer answers it
    model.get_input_embeddings = model.model.text_backbone.get_input_embeddings
    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                    modules_to_save=["enc_output"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:  # as after some training steps
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.eval()
    pm.save_pretrained(str(root / "adapter"))
    tok = load_tokenizer(folder)
    enc = tok(["cat . dog .", "cat . dog ."], padding="longest", return_tensors="pt")
    batch = {"pixel_values": torch.randn(2, 3, 64, 64, generator=g), **enc,
             "labels": [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3],
                                                                                   [0.7, 0.6, 0.25, 0.35]])},
                        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]}
    torch.save(batch, root / "batch.pt")
    return {"pm": pm, "base": folder, "adapter": root / "adapter", "batch": root / "batch.pt", "root": root}


def _out(replay, model=None):
    with torch.no_grad():
        o = replay.run(model)
    return o.logits, o.pred_boxes


def _close(a, b, tol=1e-5):
    return all(torch.allclose(x, y, atol=tol) for x, y in zip(a, b))


def test_adapter_on_its_base_folder_replays_the_live_peft_model(live):
    replay = prepare(live["base"], live["batch"], adapter=live["adapter"], hash_checkpoint=False)
    fit = replay.key_fit
    assert fit.clean, (fit.missing[:3], fit.unexpected[:3])
    assert fit.adapter.r == R and fit.adapter.lora_alpha == ALPHA
    assert len(fit.adapter.targets) == sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in live["pm"].modules())
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in replay.model.modules())  # unmerged
    plain = prepare(live["base"], live["batch"], hash_checkpoint=False)
    want = _out(plain, live["pm"])
    assert _close(_out(replay), want)
    assert not _close(_out(plain), want, 1e-3)  # the adapter matters


def test_merged_adapter_and_the_adapter_folder_alone(live, tmp_path, capsys):
    merged = prepare(live["base"], live["batch"], adapter=live["adapter"], merge_lora=True, hash_checkpoint=False)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.model.modules())
    import copy

    with torch.no_grad():
        ref = copy.deepcopy(live["pm"]).merge_and_unload()
    assert _close(_out(merged), _out(merged, ref))
    # the adapter folder alone, its base_model_name_or_path pointing at the local base folder
    cfg = json.loads((live["adapter"] / "adapter_config.json").read_text())
    alone = tmp_path / "adapter"
    alone.mkdir()
    for f in live["adapter"].iterdir():
        (alone / f.name).write_bytes(f.read_bytes())
    (alone / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(live["base"])}))
    code = main(["inspect", str(alone), str(live["batch"]), "--stack", "hf", "--json", str(tmp_path / "a.json")])
    capsys.readouterr()
    assert code in (0, 1)
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["inputs"]["adapter"] == str(alone) and report["inputs"]["lora"].startswith("unmerged")


def test_a_watched_peft_model_dump_replays_through_its_adapter(live, tmp_path, capsys):
    import nanscope

    pm = live["pm"]
    batch = torch.load(live["batch"], weights_only=False)
    batch["pixel_values"] = batch["pixel_values"].clone()
    batch["pixel_values"][1, :, 5, 6] = float("nan")
    dumps = tmp_path / "dumps"
    from nanscope.watch.report import NonFiniteStepError

    with pytest.raises(NonFiniteStepError):
        with nanscope.watch(pm, dump_dir=dumps) as watcher:
            with torch.no_grad():
                try:
                    out = pm(**batch)
                    terms = out.loss_dict
                except ValueError:  # transformers' matcher may raise on NaN boxes: check the logits then
                    terms = {"loss_ce": torch.tensor(float("nan"))}
            watcher.check(0, terms, batch)
    (dump,) = sorted(dumps.glob("step*-rank0"))
    code = main(["inspect", str(dump), "--json", str(tmp_path / "d.json")])
    capsys.readouterr()
    report = json.loads((tmp_path / "d.json").read_text())
    assert code == 1 and report["findings"][0]["code"] == "NS304"
    assert not [f for f in report["findings"] if f["code"] == "NS306" and f["severity"] == "error"]
    assert report["inputs"].get("lora", "").startswith("unmerged")
    replay = prepare(dump / "checkpoint.pth", live["batch"], text_encoder=str(live["base"]), hash_checkpoint=False)
    assert replay.key_fit.clean and _close(_out(replay), _out(replay, pm))
