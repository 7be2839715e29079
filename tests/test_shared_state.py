"""One copy of the weights after loading (issue 28): the checkpoint's tensors the model holds equal values
of are freed, the rest are kept, and NS305 counts the same non-finite values as in the file."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from nanscope.stacks.formats.shared_state import share_with_model

NAN = float("nan")


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    return m.eval()


def _counts(t: torch.Tensor) -> tuple[int, int]:
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def test_equal_tensors_become_the_models_own_and_the_rest_are_kept():
    m = _model()
    file = {k: v.clone() for k, v in m.state_dict().items()}
    file["0.bias"][1] = NAN  # a NaN never equals itself: the model's copy cannot stand for it
    file["2.weight"] = file["2.weight"].half()  # an fp16 file into the float32 model: exact widening
    file["2.bias"] = file["2.bias"].double() + 1e-12  # float64 with values float32 cannot hold
    file["extra.weight"] = torch.ones(2)  # a key the model lacks
    with torch.no_grad():
        m.load_state_dict({k: v for k, v in file.items() if k != "extra.weight"}, strict=False)
    counts = {k: _counts(v) for k, v in file.items() if v.is_floating_point()}
    out = share_with_model(m, file)
    assert list(out) == list(file)
    params = {k: v.data_ptr() for k, v in m.state_dict().items()}
    shared = {k for k, v in out.items() if params.get(k) == v.data_ptr()}
    assert shared == set(params) - {"0.bias", "2.bias"}
    for k in ("0.bias", "2.bias", "extra.weight"):
        assert out[k] is file[k]
    assert {k: _counts(v) for k, v in out.items() if v.is_floating_point()} == counts
    assert counts["0.bias"] == (1, 0)


def test_a_narrowing_dtype_is_never_shared():
    """float32 values past the fp16 range become inf in an fp16 model: the file's tensor must stay."""
    m = _model().half()
    file = {k: v.float() for k, v in m.state_dict().items()}
    file["0.weight"][0, 0] = 1e6  # finite in the file, inf once loaded
    m.load_state_dict(file)
    assert _counts(m.state_dict()["0.weight"]) == (0, 1)
    out = share_with_model(m, file)
    assert all(out[k] is file[k] for k in file if file[k].is_floating_point())
    assert _counts(out["0.weight"]) == (0, 0)


def test_prepare_frees_the_files_tensors_and_ns305_still_counts_the_files_nans(demo_files, tmp_path, monkeypatch):
    """The checkpoint's tensor objects die after `prepare` except the one holding a NaN, which NS305 names."""
    from nanscope.analyzers.numerics import nonfinite_parameters
    from nanscope.replay.diagnose import build_context
    from nanscope.replay.session import prepare
    from nanscope.stacks.capture import ForwardRecord
    from nanscope.stacks.formats import checkpoint as ckpt_mod

    name = "transformer.decoder.layers.0.linear1.weight"
    state = torch.load(demo_files.checkpoint, map_location="cpu", weights_only=True)["model"]
    state[name] = state[name].clone()
    state[name].view(-1)[:3] = NAN
    path = tmp_path / "nan.pth"
    torch.save({"model": state}, path)
    del state

    refs: dict[str, weakref.ref] = {}
    read = ckpt_mod.read_state_dict

    def recording(p, **kw):
        sd = read(p, **kw)
        refs.update({k: weakref.ref(v) for k, v in sd.items()})
        return sd

    monkeypatch.setattr(ckpt_mod, "read_state_dict", recording)
    replay = prepare(path, demo_files.batch, config=demo_files.config, hash_checkpoint=False)
    gc.collect()
    alive = {k for k, r in refs.items() if r() is not None}
    assert len(refs) > 100 and alive == {name}
    assert replay.state_dict[name] is refs[name]()  # the file's own tensor, not the model's
    assert dict(replay.model.named_parameters())[name].data_ptr() != replay.state_dict[name].data_ptr()

    ctx = build_context(replay, ForwardRecord())
    (f,) = nonfinite_parameters(ctx)
    assert f.code == "NS305" and f.where[0]["param"] == name and f.where[0]["nan"] == 3


def test_the_transformers_state_file_path_shares_too(tmp_path):
    """A transformers state-dict file: the loaded tensors become the model's own (one copy)."""
    pytest.importorskip("transformers")
    from nanscope.stacks import get_stack
    from nanscope.stacks.transformers.demo import write_hf_model
    import transformers

    folder = write_hf_model(tmp_path / "model")
    live = transformers.GroundingDinoForObjectDetection.from_pretrained(folder).eval()
    st = get_stack("transformers")
    torch.save({"model": st.dump_state_dict(live)}, tmp_path / "weights.pth")
    loaded = st.load(tmp_path / "weights.pth", config=folder / "config.json", text_encoder=str(folder),
                     hash_checkpoint=False)
    own = {k: v.data_ptr() for k, v in loaded.model.state_dict().items()}
    assert loaded.state_dict and all(own[k] == v.data_ptr() for k, v in loaded.state_dict.items())
