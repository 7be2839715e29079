"""The transformers stack through the CLI and nanscope.watch: verify-fix, dumps, bad inputs, the demo."""

from __future__ import annotations

import json
import re

import pytest
import torch

import nanscope
from nanscope.cli import main
from nanscope.stacks.transformers.demo import write_hf_model
from nanscope.stacks.transformers.loading import load_tokenizer

CAPTION = "cat . dog ."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_hf_model(tmp_path_factory.mktemp("hf") / "model")


def hf_batch(tok, seed=0, nan_pixel=False):
    g = torch.Generator().manual_seed(seed)
    enc = tok([CAPTION, CAPTION], padding="longest", return_tensors="pt")
    pv = torch.randn(2, 3, 224, 224, generator=g)
    if nan_pixel:
        pv[1, :, 7, 9] = float("nan")
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.25, 0.35]])},
              {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return {"pixel_values": pv, **enc, "labels": labels}


def checks(text):
    return [line for line in text.splitlines() if line.startswith("check ")]


@pytest.mark.parametrize("extra", [[], ["--after", "transformers"]],
                         ids=["defaults", "after-transformers"])
def test_verify_fix_passes_on_the_transformers_stack(folder, tmp_path, capsys, extra):
    batch = tmp_path / "batch.pt"
    torch.save(hf_batch(load_tokenizer(folder)), batch)
    code = main(["verify-fix", str(folder), str(batch), "--steps", "2", "--json", str(tmp_path / "v.json"), *extra])
    text = capsys.readouterr().out
    assert code == 0, text
    assert len(checks(text)) == 10 and all(" PASS " in line for line in checks(text))
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["summary"]["preset"] == "hf"  # the stack's default preset
    assert "TransformersReference" in next(c["detail"] for c in result["checks"] if c["id"] == 4)


def test_watched_loop_dumps_and_the_dump_replays_to_the_same_diagnosis(folder, tmp_path, capsys):
    import transformers

    tok = load_tokenizer(folder)
    model = transformers.GroundingDinoForObjectDetection.from_pretrained(folder)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dumps = tmp_path / "dumps"
    with pytest.raises(ValueError, match="x0, y0, x1, y1"), pytest.warns(RuntimeWarning) as warned:
        with nanscope.watch(model, dump_dir=dumps) as watcher:
            for step in range(3):
                batch = hf_batch(tok, seed=step, nan_pixel=step == 2)
                out = model(**batch)  # a NaN pixel: transformers' matcher raises on the NaN boxes
                watcher.check(step, out.loss_dict, batch)
                out.loss.backward()
                opt.step()
                opt.zero_grad()
    messages = [str(w.message) for w in warned]
    assert any("dumped" in m for m in messages) and not any("could not be replayed" in m for m in messages), messages
    (dump,) = sorted(dumps.glob("step*-rank0"))
    manifest = json.loads((dump / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["stack"]["stack"] == "transformers"
    assert main(["inspect", str(dump), "--json", str(tmp_path / "dump.json")]) == 1
    direct = tmp_path / "direct.pt"
    torch.save(hf_batch(tok, seed=2, nan_pixel=True), direct)
    model.eval().save_pretrained(tmp_path / "weights")  # the weights of the dump: from before step 2's update
    tok.save_pretrained(tmp_path / "weights")
    assert main(["inspect", str(tmp_path / "weights"), str(direct), "--json", str(tmp_path / "direct.json")]) == 1
    capsys.readouterr()
    from_dump, from_batch = (json.loads((tmp_path / n).read_text()) for n in ("dump.json", "direct.json"))
    assert from_dump["findings"][0]["code"] == "NS304" and from_dump["findings"][0]["where"][0]["image"] == 1
    assert [f["code"] for f in from_dump["findings"]] == [f["code"] for f in from_batch["findings"]]
    assert [f["count"] for f in from_dump["findings"]] == [f["count"] for f in from_batch["findings"]]


def _bert_folder(path):
    import transformers

    transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("no-weights", "has a config.json but no weights"),
    ("other-model", "has model_type 'bert'"),
    ("no-tokenizer", "holds no tokenizer"),
])
def test_bad_inputs_exit_2_with_one_paragraph(folder, tmp_path, capsys, kind, message):
    import shutil

    target = tmp_path / kind
    if kind == "no-weights":
        target.mkdir()
        shutil.copy(folder / "config.json", target / "config.json")
    elif kind == "other-model":
        _bert_folder(target)
    else:
        target.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(folder / name, target / name)
    batch = tmp_path / "batch.pt"
    torch.save(hf_batch(load_tokenizer(folder)), batch)
    capsys.readouterr()  # what the set-up wrote (5.x progress bars of save_pretrained)
    assert main(["inspect", str(target), str(batch)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "Loading weights" not in err
    *progress_lines, error = err.splitlines()  # stages that ended before the error said so, then one paragraph
    assert error.startswith("nanscope: error: ") and message in error
    assert all(re.fullmatch(r"nanscope: .+ in \d+\.\d s", ln) for ln in progress_lines), progress_lines


def test_demo_on_the_transformers_stack(tmp_path, capsys):
    assert main(["demo", "--stack", "hf", "--out", str(tmp_path / "demo"), "--no-html"]) == 0
    text = capsys.readouterr().out
    verdicts = [line for line in text.splitlines() if line.startswith("nanscope ")]
    assert verdicts[0].startswith("nanscope inspect: BROKEN")
    assert verdicts[1] == "nanscope verify-fix: FIXED - 10/10 checks pass"
    # each finding is a "cause N: NSxxx ..." line, or indented under its cause as a consequence
    findings = [m.group(1) for m in (re.match(r"\s*(?:cause \d+: )?(NS\d{3}) ", ln) for ln in text.splitlines()) if m]
    assert findings[0] == "NS110" and {"NS102", "NS101", "NS001", "NS111"} <= set(findings)
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()


def test_the_weights_file_named_directly_loads_like_its_folder(folder, tmp_path, capsys):
    """save_pretrained's model.safetensors given as the checkpoint: its tokenizer and config beside it are used,
    and its keys (renamed and tied when 5.x saves) load as from_pretrained loads them: no NS306 error."""
    import transformers
    from safetensors.torch import load_file

    # independently: the file's own names differ from the model's (5.x) or not (4.x); from_pretrained fits all
    _, info = transformers.GroundingDinoForObjectDetection.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    renamed = set(load_file(str(folder / "model.safetensors"))) != set(
        transformers.GroundingDinoForObjectDetection.from_pretrained(folder).state_dict())
    batch = tmp_path / "batch.pt"
    torch.save(hf_batch(load_tokenizer(folder)), batch)
    results = {}
    for name, ckpt in (("file", folder / "model.safetensors"), ("folder", folder)):
        main(["inspect", str(ckpt), str(batch), "--stack", "hf", "--json", str(tmp_path / f"{name}.json")])
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["findings"]
    capsys.readouterr()
    ns306 = [f for f in results["file"] if f["code"] == "NS306"]
    assert all(f["severity"] == "info" for f in ns306)
    assert bool(ns306) == renamed  # the note says the keys were renamed exactly when they were
    strip = [(f["code"], f["count"]) for f in results["file"] if f["code"] != "NS306"]
    assert strip == [(f["code"], f["count"]) for f in results["folder"]]


def test_a_state_dict_under_a_wrapper_prefix_loads_on_the_transformers_stack(folder, tmp_path, capsys):
    """A LightningModule's `self.model` (keys under 'model.', on top of the model's own 'model.' prefix)."""
    import transformers

    model = transformers.GroundingDinoForObjectDetection.from_pretrained(folder)
    wrapped = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()} | {"loss_w": torch.ones(2)}},
               wrapped)
    batch = tmp_path / "batch.pt"
    torch.save(hf_batch(load_tokenizer(folder)), batch)
    results = {}
    for name, ckpt, extra in (("wrapped", wrapped, ["--config", str(folder)]), ("folder", folder, [])):
        main(["inspect", str(ckpt), str(batch), "--stack", "hf", "--json", str(tmp_path / f"{name}.json"), *extra])
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["findings"]
    capsys.readouterr()
    (note,) = [f for f in results["wrapped"] if f["code"] == "NS306"]
    assert note["severity"] == "info" and "'model.'" in note["message"]
    assert [(f["code"], f["count"]) for f in results["wrapped"] if f["code"] != "NS306"] == \
        [(f["code"], f["count"]) for f in results["folder"]]
