"""nanscope.stacks.formats.mmengine_records: a real MMEngine checkpoint read under weights_only."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from nanscope.errors import CheckpointError
from nanscope.stacks.formats.checkpoint import read_checkpoint, read_state_dict
from nanscope.stacks.formats.mmengine_records import HistoryBufferRecord, record_getattr, skipped_entries


@pytest.fixture
def ckpt(tmp_path):
    from mmengine.config import ConfigDict
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint

    hub = MessageHub.get_instance("nanscope-records")
    for v in (2.0, 1.5):
        hub.update_scalar("train/loss", v)
    hub.update_info("arr", np.arange(3, dtype=np.int16))
    lin = torch.nn.Linear(3, 2)
    obj = {"meta": {"seed": np.int64(7), "cfg": ConfigDict(a=1, b=dict(c=[1, 2]))}, "state_dict": lin.state_dict(),
           "message_hub": hub.state_dict(), "optimizer": torch.optim.SGD(lin.parameters(), lr=0.1).state_dict()}
    p = tmp_path / "epoch_1.pth"
    save_checkpoint(obj, str(p))
    return p, obj, hub


def test_values_equal_the_unpickled_ones(ckpt):
    p, obj, hub = ckpt
    ours = read_checkpoint(p)  # no trust
    real = torch.load(p, weights_only=False)  # the test's own file: unpickled for the reference
    assert ours["meta"]["seed"] == real["meta"]["seed"] and isinstance(ours["meta"]["seed"], np.int64)
    assert ours["meta"]["cfg"] == real["meta"]["cfg"].to_dict() and type(ours["meta"]["cfg"]) is dict
    buf, ref = ours["message_hub"]["log_scalars"]["train/loss"], real["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buf, HistoryBufferRecord)
    np.testing.assert_array_equal(buf._log_history, ref.data[0])
    np.testing.assert_array_equal(ours["message_hub"]["runtime_info"]["arr"], np.arange(3, dtype=np.int16))
    assert set(read_state_dict(p)) == set(obj["state_dict"])
    assert skipped_entries(ours) == ["meta (dict)", "message_hub (dict of HistoryBuffer records)", "optimizer (dict)"]


def test_getattr_answers_only_for_history_buffer():
    assert record_getattr(HistoryBufferRecord, "min") == "HistoryBuffer.min"
    with pytest.raises(pickle.UnpicklingError, match="only getattr"):
        record_getattr(torch, "load")


def test_a_getattr_on_anything_else_is_refused(tmp_path):
    import argparse

    class Evil:  # getattr on an allow-listed class (argparse.Namespace), not on HistoryBuffer
        def __reduce__(self):
            return (getattr, (argparse.Namespace, "__init__"))

    p = tmp_path / "evil.pth"
    torch.save({"state_dict": {"a": torch.ones(1)}, "x": Evil()}, p)
    with pytest.raises(CheckpointError, match="only getattr"):
        read_checkpoint(p)
