"""Checkpoint files as trainers write them: Open-GroundingDino's args, safetensors, half precision, bad bytes,
tied weights that the file holds untied, and MMDetection's key names."""

from __future__ import annotations

import argparse
import os
import pathlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nanscope.analyzers.checkpoint_fit import checkpoint_fit
from nanscope.errors import CheckpointError
from nanscope.findings import Severity
from nanscope.stacks.checkpoint import file_kind, key_fit, read_state_dict


def _ogd_checkpoint(model_sd: dict[str, torch.Tensor]) -> dict:
    """What Open-GroundingDino's main.py saves: model, optimizer, lr_scheduler, epoch and args."""
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=1e-4)
    w.sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    args = argparse.Namespace(lr=1e-4, backbone="swin_T_224_1k", lr_drop_list=[33, 45], amp=False,
                              config_file="cfg_odvg.py", options={"dn_number": 0}, world_size=8)
    return {"model": model_sd, "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "epoch": 3,
            "args": args}


def test_open_groundingdino_checkpoint_loads_without_trust(tmp_path):
    sd = {"a.weight": torch.randn(2, 2), "b": torch.zeros(3)}
    p = tmp_path / "checkpoint0003.pth"
    torch.save(_ogd_checkpoint(sd), p)
    got = read_state_dict(p)
    assert set(got) == set(sd) and torch.equal(got["a.weight"], sd["a.weight"])


def test_any_other_pickled_object_is_still_refused(tmp_path):
    p = tmp_path / "c.pth"
    ck = _ogd_checkpoint({"a": torch.ones(1)})
    ck["args"].output_dir = pathlib.PurePosixPath("/runs/x")  # one non-allowed object inside the Namespace
    torch.save(ck, p)
    with pytest.raises(CheckpointError, match=r"PurePosixPath.*--trust-checkpoint"):
        read_state_dict(p)
    assert set(read_state_dict(p, trust=True)) == {"a"}


def test_random_bytes_are_not_a_torch_file_and_never_ask_for_trust(tmp_path):
    p = tmp_path / "weights.pth"
    p.write_bytes(os.urandom(4096).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    assert file_kind(p) == "unknown"
    with pytest.raises(CheckpointError, match="is not a torch file") as e:
        read_state_dict(p)
    assert "trust" not in str(e.value) and "pickled" not in str(e.value)


def test_safetensors_named_pth_loads_as_tensors(tmp_path):
    from safetensors.torch import save_file

    sd = {"x.weight": torch.randn(3, 4), "x.bias": torch.randn(3)}
    p = tmp_path / "model.pth"
    save_file(sd, str(p))
    assert file_kind(p) == "safetensors"
    got = read_state_dict(p)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_damaged_safetensors_says_so(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "model.safetensors"
    save_file({"x": torch.randn(100)}, str(p))
    p.write_bytes(p.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="damaged safetensors"):
        read_state_dict(p)


def test_half_precision_file_is_noted_in_the_key_fit():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    sd = {k: v.half() for k, v in model.state_dict().items()}
    fit = key_fit(model, sd)
    assert fit.clean and fit.converted == (("float16", "float32", 4),)
    (f,) = checkpoint_fit(SimpleNamespace(key_fit=fit))
    assert f.severity is Severity.WARNING and "4 float16 tensor(s) to float32" in f.message and "--amp" in f.message
    assert checkpoint_fit(SimpleNamespace(key_fit=key_fit(model, model.state_dict()))) == []


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(3, 3)] * 3)  # one Linear, three names (groundingdino's box heads)
        self.other = nn.Linear(3, 1)


def test_tied_parameters_with_differing_file_values_are_ns306():
    tied = _Tied()
    untied = {f"heads.{i}.{n}": torch.randn(p.shape) for i in range(3) for n, p in nn.Linear(3, 3).named_parameters()}
    untied.update({f"other.{k}": v for k, v in tied.other.state_dict().items()})
    fit = key_fit(tied, untied)
    assert not fit.clean and not (fit.missing or fit.unexpected or fit.mismatched)
    groups = {keys for keys, _ in fit.tied_differ}
    assert groups == {("heads.0.weight", "heads.1.weight", "heads.2.weight"), ("heads.0.bias", "heads.1.bias", "heads.2.bias")}
    expected = max(float((untied[f"heads.{i}.weight"] - untied["heads.0.weight"]).abs().max()) for i in (1, 2))
    assert dict(fit.tied_differ)[("heads.0.weight", "heads.1.weight", "heads.2.weight")] == pytest.approx(expected)
    (f,) = checkpoint_fit(SimpleNamespace(key_fit=fit))
    assert f.severity is Severity.ERROR and f.count == 2 and "untied" in f.message
    same = {k: (untied["heads.0." + k.split(".", 2)[2]] if k.startswith("heads") else v) for k, v in untied.items()}
    assert key_fit(tied, same).clean
