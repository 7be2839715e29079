"""The stack seam: the registry, detection from models and files, and that replays go through the stack."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nanscope.errors import ConfigError
from nanscope.replay.batch import load_batch
from nanscope.stacks import get_stack, stack_for_checkpoint, stack_for_model, stack_names
from nanscope.stacks.base import Stack
from nanscope.stacks.groundingdino.stack import GroundingDinoPy


def test_unknown_stack_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        get_stack("mmdet-nope")
    for name in stack_names():
        assert name in str(info.value)


def test_every_registered_stack_implements_the_seam():
    for name in stack_names():
        st = get_stack(name)
        assert isinstance(st, Stack) and st.name == name
        assert get_stack(name) is st  # one instance per stack


def test_stack_for_model_finds_the_detector_inside_wrappers(demo_replay):
    class Wrapper(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.module = m

    st = stack_for_model(Wrapper(demo_replay.model))
    assert isinstance(st, GroundingDinoPy)
    assert st.find_model(Wrapper(demo_replay.model)) is demo_replay.model
    with pytest.raises(ConfigError, match="no GroundingDINO"):
        stack_for_model(torch.nn.Linear(2, 2))


def test_a_folder_no_stack_reads_is_refused_by_name(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="folder that no stack reads"):
        stack_for_checkpoint(tmp_path)


def test_model_call_and_capture_match_a_direct_call(demo_replay):
    """The stack's model call is exactly groundingdino's `model(images, captions=...)`."""
    st = demo_replay.stack
    args, kwargs = st.model_call(demo_replay.model, demo_replay.batch, demo_replay.device)
    assert torch.equal(args[0], demo_replay.batch.images) and kwargs["captions"] == list(demo_replay.batch.captions)
    with torch.no_grad():
        direct = demo_replay.model(demo_replay.batch.images, captions=list(demo_replay.batch.captions))
        rec = demo_replay.forward()
    assert torch.equal(rec.layer_logits[-1], direct["pred_logits"])
    assert torch.equal(rec.layer_boxes()[-1], direct["pred_boxes"])
    assert rec.layer_names()[-1] == "enc" and rec.has_encoder


def test_load_tokenizer_without_the_model_gives_the_models_tokenization(demo_files, demo_replay):
    tok, max_len = get_stack("groundingdino-py").load_tokenizer(config=demo_files.config)
    assert max_len == 256 == demo_replay.max_text_len
    for caption in load_batch(demo_files.batch).captions:
        assert tok(caption)["input_ids"] == demo_replay.model.tokenizer(caption)["input_ids"]


def test_dump_meta_is_plain_json_values(demo_replay):
    import json

    meta = demo_replay.stack.dump_meta(demo_replay.model)
    assert meta["stack"] == "groundingdino-py" and meta["max_text_len"] == 256
    assert json.loads(json.dumps(meta)) == meta
    sd = demo_replay.stack.dump_state_dict(demo_replay.model)
    assert set(sd) == set(demo_replay.model.state_dict()) and all(v.device.type == "cpu" for v in sd.values())


def test_build_model_finds_the_text_encoder_folder_the_config_names_beside_it(demo_files, tmp_path, monkeypatch):
    """A library user's `build_model(config)` from another folder: the config's relative text_encoder_type is
    the folder next to the config (as the CLI resolves it), not a Hugging Face name to download."""
    from nanscope.stacks.groundingdino.stack import build_model

    monkeypatch.chdir(tmp_path)
    _, cfg = build_model(demo_files.config, seed=0)
    assert Path(cfg.text_encoder_type) == Path(demo_files.text_encoder).resolve()
