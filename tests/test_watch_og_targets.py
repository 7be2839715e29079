"""A watched Open-GroundingDino-shaped loop replays with no extra line: its targets carry `boxes`, `labels`
indexing the image's `cap_list`, and `caption` (datasets/odvg.py's target dict), and the loop calls
`model(samples, captions=captions)` and `criterion(outputs, targets, cap_list, captions)` (engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nanscope
from nanscope.cli import main
from nanscope.stacks.groundingdino.demo import demo_batch
from nanscope.stacks.groundingdino.stack import build_model
from nanscope.watch.dump_targets import replay_gaps
from nanscope.watch.report import NonFiniteStepError

TRAINERS = Path(__file__).parents[1] / "fixtures" / "criteria" / "trainers.py"


def og_targets(raw: dict) -> list[dict]:
    """Open-GroundingDino's VG targets: cap_list = the unique phrases, labels = each box's index into it."""
    out = []
    for t, caption in zip(raw["targets"], raw["captions"]):
        cap_list = list(dict.fromkeys(t["phrases"]))
        out.append({"boxes": t["boxes"], "labels": torch.tensor([cap_list.index(p) for p in t["phrases"]]),
                    "cap_list": cap_list, "caption": caption, "size": torch.tensor([224, 224])})
    return out


def test_og_targets_have_no_replay_gap() -> None:
    raw = demo_batch(0, long=False)
    assert replay_gaps((raw["images"], og_targets(raw)), None) == []
    bare = [{k: v for k, v in t.items() if k != "cap_list"} for t in og_targets(raw)]
    assert replay_gaps((raw["images"], bare), None)  # labels alone name nothing: still a gap


def test_a_watched_og_loop_dump_replays_with_the_phrases_its_labels_name(demo_files, tmp_path, capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanscope_test_trainers_w", TRAINERS)
    trainers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainers)
    model, _ = build_model(demo_files.config, text_encoder=demo_files.text_encoder, seed=0)
    model.load_state_dict(torch.load(demo_files.checkpoint, weights_only=True)["model"])
    criterion = trainers.build_open_gdino()
    dumps = tmp_path / "dumps"
    k = 1
    with pytest.raises(NonFiniteStepError) as info:
        with nanscope.watch(model, dumps, config=demo_files.config, text_encoder=demo_files.text_encoder) as w:
            for step in range(3):
                raw = demo_batch(step, long=False)
                if step == k:
                    raw["images"][1, 2, 10, 20] = float("nan")
                samples, targets = raw["images"], og_targets(raw)
                captions = [t["caption"] for t in targets]
                cap_list = [t["cap_list"] for t in targets]
                with nanscope.capture(model, detach=False) as cap:
                    model(samples, captions=captions)
                outputs = cap.last.to_outputs()
                outputs["token"] = model.tokenizer(captions, padding="longest", return_tensors="pt")
                mask = outputs["text_token_mask"]  # Open-GroundingDino pads it to max_text_len (256)
                outputs["text_mask"] = torch.nn.functional.pad(mask, (0, 256 - mask.shape[1]), value=False)
                loss_dict = criterion(outputs, targets, cap_list, captions)
                w.check(step, loss_dict, (samples, targets))
                if step == k:
                    break
    report = info.value.report
    batch = torch.load(Path(report.dump) / "batch.pt", weights_only=True)
    want = demo_batch(k, long=False)
    assert [t["phrases"] for t in batch["targets"]] == [t["phrases"] for t in want["targets"]]
    out = tmp_path / "r.json"
    code = main(["inspect", str(report.dump), "--json", str(out)])
    capsys.readouterr()
    assert code == 1  # replayed and diagnosed (exit 2 would be 'the targets have no phrases')
    result = json.loads(out.read_text())
    assert result["findings"][0]["code"] == "NS304"
