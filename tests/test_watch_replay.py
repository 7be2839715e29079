"""A dump written by nanscope.watch replays through `nanscope inspect DUMP` with the same diagnosis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nanscope
from nanscope.replay.batch import validate_batch
from nanscope.cli import main
from nanscope.stacks.groundingdino.demo import demo_batch
from nanscope.stacks.groundingdino.stack import build_model
from nanscope.replay.positive_map import build_text_info
from nanscope.watch.report import NonFiniteStepError

CRITERIA = str(Path(__file__).parents[1] / "fixtures" / "criteria" / "simple.py")


def _masked():
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanscope_test_criteria", CRITERIA)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.masked


def test_inspect_dump_reproduces_the_nonfinite_term_and_names_the_cause(demo_files, tmp_path, capsys):
    model, _ = build_model(demo_files.config, text_encoder=demo_files.text_encoder, seed=0)
    model.load_state_dict(torch.load(demo_files.checkpoint, weights_only=True)["model"])
    # A masked loss without a matcher: a NaN image makes scipy's matcher raise before any loss exists
    # (inspect reports that as NS203); here the NaN must reach the loss terms the watcher checks.
    criterion = _masked()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    k = 1
    dumps = tmp_path / "nan-dumps"
    with pytest.raises(NonFiniteStepError) as info:
        with nanscope.watch(model, dumps, config=demo_files.config, text_encoder=demo_files.text_encoder) as w:
            for step in range(3):
                raw = demo_batch(step, long=False)
                if step == k:
                    raw["images"][1, 2, 10, 20] = float("nan")  # a corrupt pixel in image 1, channel 2
                b = validate_batch(raw)
                texts = build_text_info(model.tokenizer, b)
                targets = [{"boxes": t.boxes, "positive_map": ti.positive_map} for t, ti in zip(b.targets, texts)]
                with nanscope.capture(model, detach=False) as cap:
                    model(b.images, captions=list(b.captions))
                terms = criterion(cap.last.to_outputs(), targets)
                w.check(step, terms, raw)
                opt.zero_grad()
                sum(terms.values()).backward()
                opt.step()
    report = info.value.report
    assert report.step == k
    bad_terms = set(report.nonfinite_terms)
    assert bad_terms

    out = tmp_path / "r.json"
    code = main(["inspect", str(report.dump), "--criterion", f"{CRITERIA}:masked", "--json", str(out)])
    capsys.readouterr()
    assert code == 1
    result = json.loads(out.read_text())
    assert result["findings"][0]["code"] == "NS304"  # the cause, not the symptom
    assert {"image": 1, "channel": 2} .items() <= result["findings"][0]["where"][0].items()
    ns001 = next(f for f in result["findings"] if f["code"] == "NS001")
    assert {w["term"] for w in ns001["where"]} == bad_terms  # the same non-finite terms as in training

    # The dump_dir itself works too: the origin rank's dump is replayed.
    code = main(["inspect", str(dumps), "--select", "NS304"])
    assert code == 1 and "NS304" in capsys.readouterr().out
    assert Path(report.dump).parent == dumps
