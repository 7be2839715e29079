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
from nanscope.stacks.formats.checkpoint import file_kind, key_fit, read_state_dict


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


def test_mmengine_objects_load_as_records_without_their_module(tmp_path, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("mmengine.logging.history_buffer")  # mmengine is not installed: its class, by name

    class HistoryBuffer:
        def __init__(self) -> None:
            self.data = [1.0, 2.0]

    HistoryBuffer.__module__ = mod.__name__
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    mod.HistoryBuffer = HistoryBuffer
    for parent in ("mmengine", "mmengine.logging"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    p = tmp_path / "epoch_12.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": {"a": torch.ones(1)},
                "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}}}, p)
    for name in ("mmengine", "mmengine.logging", mod.__name__):  # read without mmengine: nothing of it runs
        monkeypatch.delitem(sys.modules, name)
    assert set(read_state_dict(p)) == {"a"}
    from nanscope.stacks.formats.checkpoint import read_checkpoint
    from nanscope.stacks.formats.mmengine_records import HistoryBufferRecord

    buf = read_checkpoint(p)["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buf, HistoryBufferRecord) and buf.data == [1.0, 2.0]


def test_random_bytes_are_not_a_torch_file_and_never_ask_for_trust(tmp_path):
    p = tmp_path / "weights.pth"
    p.write_bytes(os.urandom(4096).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    assert file_kind(p) == "unknown"
    with pytest.raises(CheckpointError, match="not a readable torch file: it starts with bytes") as e:
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


# ---------------------------------------------------------------- MMDetection's key names


def _swin_to_unfold_reduction(x):  # mmdet's correct_unfold_reduction_order
    out_ch, in_ch = x.shape
    return x.reshape(out_ch, 4, in_ch // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_ch, in_ch)


def _swin_to_unfold_norm(x):  # mmdet's correct_unfold_norm_order
    return x.reshape(4, x.shape[0] // 4)[[0, 2, 1, 3], :].transpose(0, 1).reshape(x.shape[0])


def to_mmdet(sd: dict[str, torch.Tensor], dec_layers: int) -> dict[str, torch.Tensor]:
    """groundingdino -> mmdet names, written after MMDetection 3.3's tools/model_converters/groundingdino_to_mmdet.py
    (its encoder branch is `reg_branches.6` for six decoder layers: `dec_layers` here), plus the denoising label
    embedding an mmdet-trained model holds as dn_query_generator.label_embedding."""
    out = {}
    for k, v in sd.items():
        k = "module." + k
        if k.startswith("module.bbox_embed"):
            k = k.replace("module.bbox_embed", "module.transformer.decoder.bbox_embed")
        n = None
        if "module.backbone.0" in k:
            n = k.replace("module.backbone.0", "backbone")
            n = n.replace("patch_embed.proj", "patch_embed.projection") if "patch_embed.proj" in n else n.replace(
                "pos_drop", "drop_after_pos")
            if "layers" in n:
                n = n.replace("layers", "stages")
                if "mlp.fc1" in n:
                    n = n.replace("mlp.fc1", "ffn.layers.0.0")
                elif "mlp.fc2" in n:
                    n = n.replace("mlp.fc2", "ffn.layers.1")
                elif "attn" in n:
                    n = n.replace("attn", "attn.w_msa")
                if "downsample" in k:
                    v = _swin_to_unfold_reduction(v) if "reduction." in k else _swin_to_unfold_norm(v)
        elif "module.bert" in k:
            n = k.replace("module.bert", "language_model.language_backbone.body.model")
        elif "module.feat_map" in k:
            n = k.replace("module.feat_map", "text_feat_map")
        elif "module.input_proj" in k:
            n = k.replace("module.input_proj", "neck.convs")
            n = n.replace("neck.convs.3", "neck.extra_convs.0")
            n = n.replace("0.weight", "conv.weight").replace("0.bias", "conv.bias")
            n = n.replace("1.weight", "gn.weight").replace("1.bias", "gn.bias")
        elif "module.transformer.level_embed" in k:
            n = "level_embed"
        elif "module.transformer.encoder" in k:
            n = k.replace("module.transformer.encoder", "encoder")
            for a, b in (("norm1", "norms.0"), ("norm2", "norms.1"), ("norm3", "norms.2"), ("linear1", "ffn.layers.0.0"),
                         ("linear2", "ffn.layers.1")):
                n = n.replace(a, b)
            if "text_layers" in n and "self_attn" in n:
                n = n.replace("self_attn", "self_attn.attn")
        elif "module.transformer.enc_output" in k:
            n = (k.replace("module.transformer.enc_output_norm", "memory_trans_norm") if "norm" in k
                 else k.replace("module.transformer.enc_output", "memory_trans_fc"))
        elif "module.transformer.enc_out_bbox_embed.layers" in k:
            j = int(k.split(".")[4])
            n = f"bbox_head.reg_branches.{dec_layers}.{2 * j}.{k.split('.')[-1]}"
        elif "module.transformer.tgt_embed" in k:
            n = k.replace("module.transformer.tgt_embed", "query_embedding")
        elif "module.transformer.decoder" in k:
            n = k.replace("module.transformer.decoder", "decoder")
            for a, b in (("norm1", "norms.2"), ("catext_norm", "norms.1"), ("norm2", "norms.0"), ("norm3", "norms.3")):
                n = n.replace(a, b)
            if "ca_text" in n:
                n = n.replace("ca_text", "cross_attn_text")
                for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
                    n = n.replace(p, "attn." + p)
            n = n.replace("linear1", "ffn.layers.0.0").replace("linear2", "ffn.layers.1")
            n = n.replace("self_attn", "self_attn.attn")
            if "bbox_embed" in n:
                parts = n.split(".")
                n = f"bbox_head.reg_branches.{parts[2]}.{2 * int(parts[4])}.{parts[-1]}"
        elif k.startswith("module.label_enc."):
            n = "dn_query_generator.label_embedding." + k.split(".")[-1]
        assert n is not None, f"no mmdet name for {k}"
        out[n] = v
    return out


@pytest.fixture(scope="module")
def demo_sd(demo_files):
    return torch.load(demo_files.checkpoint, weights_only=True)["model"]


def test_mmdet_names_convert_back_to_groundingdino(demo_sd):
    from nanscope.stacks.formats import mmdet_keys

    mm = to_mmdet(demo_sd, dec_layers=1)
    assert {"backbone.stages.0.blocks.0.attn.w_msa.qkv.weight", "backbone.stages.0.downsample.reduction.weight",
            "neck.extra_convs.0.conv.weight", "decoder.layers.0.cross_attn_text.attn.in_proj_weight",
            "bbox_head.reg_branches.0.4.weight", "bbox_head.reg_branches.1.0.weight",
            "encoder.text_layers.0.self_attn.attn.in_proj_weight"} <= set(mm)
    red = "backbone.0.layers.0.downsample.reduction.weight"
    assert not torch.equal(mm["backbone.stages.0.downsample.reduction.weight"], demo_sd[red])  # re-ordered
    back = mmdet_keys.to_groundingdino(mm)
    assert set(back) == set(demo_sd)
    assert all(torch.equal(back[k], demo_sd[k]) for k in demo_sd)
    assert not mmdet_keys.is_mmdet_state(demo_sd) and mmdet_keys.is_mmdet_state(mm)


def test_mmdet_checkpoint_replays_equal(demo_files, fixture_files, demo_sd, tmp_path):
    from nanscope.replay.session import prepare

    p = tmp_path / "mmdet.pth"
    mm = to_mmdet(demo_sd, 1)
    mm["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)  # DetDataPreprocessor's
    mm["data_preprocessor.std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    torch.save({"meta": {"epoch": 12, "mmengine_version": "0.10.4"}, "state_dict": mm}, p)
    ref = prepare(demo_files.checkpoint, fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
    got = prepare(p, fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
    assert got.key_fit.clean and any("MMDetection" in n for n in got.key_fit.notes)
    assert {k for k, _ in got.key_fit.benign} >= {"data_preprocessor.mean", "data_preprocessor.std"}
    with torch.no_grad():
        a, b = ref.run(), got.run()
    assert torch.equal(a["pred_boxes"], b["pred_boxes"]) and torch.equal(a["pred_logits"], b["pred_logits"])
    (f,) = checkpoint_fit(SimpleNamespace(key_fit=got.key_fit))
    assert f.severity is Severity.INFO and "MMDetection" in f.message


def test_mm_grounding_dino_is_refused_naming_what_is_missing(demo_sd, tmp_path, demo_files):
    from nanscope.replay.session import prepare

    mm = to_mmdet(demo_sd, 1)
    for i in range(2):
        mm[f"bbox_head.cls_branches.{i}.bias"] = torch.tensor([-4.6])
        mm[f"bbox_head.cls_branches.{i}.log_scale"] = torch.tensor([0.0])
    p = tmp_path / "mm_gdino.pth"
    torch.save({"state_dict": mm}, p)
    with pytest.raises(CheckpointError, match=r"MM-GroundingDINO.*cls_branches.0.bias.*MMGroundingDinoForObjectDetection"):
        prepare(p, demo_files.batch, config=demo_files.config, hash_checkpoint=False, stack="groundingdino-py")
    with pytest.raises(CheckpointError, match=r"learned logit scale.*cls_branches.0.log_scale"):
        prepare(p, demo_files.batch, config=demo_files.config, hash_checkpoint=False)  # found as an MM checkpoint


def test_untied_box_heads_are_built_untied(demo_files, fixture_files, tmp_path):
    import json

    from nanscope.replay.session import prepare
    from nanscope.stacks.groundingdino.stack import build_model

    cfg = json.loads(demo_files.config.read_text())
    cfg.update(dec_layers=2, text_encoder_type=str(demo_files.text_encoder))  # two decoder layers, heads tied
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg))
    untied = tmp_path / "untied.json"
    untied.write_text(json.dumps({**cfg, "dec_pred_bbox_embed_share": False}))
    live, _ = build_model(untied, seed=0)  # deep copies of one head: equal until fine-tuning moves them apart
    assert live.bbox_embed[0] is not live.bbox_embed[1]
    with torch.no_grad():
        for p in live.bbox_embed[1].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    torch.save({"model": live.state_dict()}, tmp_path / "gd.pth")
    torch.save({"state_dict": to_mmdet(live.state_dict(), 2)}, tmp_path / "mm.pth")
    torch.save({"state_dict": {f"model.{k}": v for k, v in live.state_dict().items()}}, tmp_path / "wrapped.ckpt")
    for name in ("gd.pth", "mm.pth", "wrapped.ckpt"):  # the last: a LightningModule's `self.model`
        got = prepare(tmp_path / name, fixture_files.healthy, config=config, hash_checkpoint=False)
        assert got.model.bbox_embed[0] is not got.model.bbox_embed[1]
        assert got.key_fit.clean and any("untied" in n for n in got.key_fit.notes)
        with torch.no_grad():
            out, expected = got.run(), got.run(live)
        assert torch.allclose(out["pred_boxes"], expected["pred_boxes"], atol=1e-5, rtol=0)


def test_open_groundingdino_checkpoint_of_the_demo_replays_without_trust(demo_files, fixture_files, demo_sd, tmp_path):
    from nanscope.replay.session import prepare

    p = tmp_path / "checkpoint0003.pth"
    torch.save(_ogd_checkpoint(demo_sd), p)
    got = prepare(p, fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
    assert got.key_fit.clean and len(got.key_fit.matched) == len(demo_sd)


def test_transformers_stack_names_an_adapter_that_is_not_there(tmp_path):
    from nanscope.stacks import get_stack
    from nanscope.stacks.transformers.demo import write_hf_model

    folder = write_hf_model(tmp_path / "model", num_queries=50)
    with pytest.raises(CheckpointError, match="adapter .*does not exist; expected a PEFT adapter folder or file"):
        get_stack("hf").load(folder, adapter=tmp_path / "adapter")


def _lightning_checkpoint(model: nn.Module, root: pathlib.Path) -> pathlib.Path:
    """The .ckpt a real Lightning Trainer writes for a LightningModule holding `model` as `self.detector`
    (and a loss buffer of its own beside it); lr=0, so the weights are the model's."""
    L = pytest.importorskip("lightning.pytorch")

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.detector = model
            self.register_buffer("class_weight", torch.ones(3))
            self.scale = nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            return (self.scale * batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD([self.scale], lr=0.0)

    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(Module(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(1, 1))))
    (ckpt,) = root.rglob("*.ckpt")
    return ckpt


def test_lightning_and_compiled_checkpoints_load_from_under_their_prefix(demo_files, fixture_files, tmp_path):
    """Lightning saves the model under its attribute ('detector.'), torch.compile under '_orig_mod.': the
    weights load from there and the replay equals the plain checkpoint's; the wrapper's own keys are benign."""
    from nanscope.replay.session import prepare

    ref = prepare(demo_files.checkpoint, fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
    ckpt = _lightning_checkpoint(ref.model, tmp_path / "lightning")
    assert all(k.startswith(("detector.", "class_weight", "scale")) for k in torch.load(ckpt)["state_dict"])
    compiled = tmp_path / "compiled.pth"
    torch.save({"model": torch.compile(ref.model).state_dict()}, compiled)  # keys under '_orig_mod.'
    with torch.no_grad():
        want = ref.run()
    for path, prefix, outside in ((ckpt, "detector.", {"class_weight", "scale"}), (compiled, "_orig_mod.", set())):
        got = prepare(path, fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
        fit = got.key_fit
        assert fit.prefix == prefix and not fit.missing and not fit.unexpected, (path, fit.missing[:3])
        assert {k for k, _ in fit.benign} >= outside and any(prefix in n for n in fit.notes)
        with torch.no_grad():
            out = got.run()
        assert torch.equal(out["pred_logits"], want["pred_logits"]) and torch.equal(out["pred_boxes"], want["pred_boxes"])


def test_a_prefix_under_which_too_few_weights_sit_is_still_refused(demo_sd, demo_files, fixture_files, tmp_path):
    from nanscope.replay.session import prepare

    few = dict(list(demo_sd.items())[: len(demo_sd) // 3])
    p = tmp_path / "few.pth"
    torch.save({"state_dict": {f"detector.{k}": v for k, v in few.items()}}, p)
    with pytest.raises(CheckpointError, match="does not look like a checkpoint"):
        prepare(p, fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)


def test_accelerate_safetensors_without_shared_tensors_loads_clean(demo_files, fixture_files, tmp_path):
    """Accelerate's save_state writes model.safetensors without the tied box heads' duplicates (safetensors
    cannot hold shared tensors): those keys are tied to keys the file holds, not missing."""
    accelerate = pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    from nanscope.replay.session import prepare

    ref = prepare(demo_files.checkpoint, fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
    acc = accelerate.Accelerator(cpu=True)
    acc.save_model(acc.prepare(ref.model), str(tmp_path / "saved"))
    path = tmp_path / "saved" / "model.safetensors"
    dropped = set(ref.model.state_dict()) - set(load_file(str(path)))
    assert dropped  # the real writer left the shared tensors out
    got = prepare(path, fixture_files.healthy, config=demo_files.config, hash_checkpoint=False)
    assert got.key_fit.clean and not got.key_fit.missing
    assert {k for k, why in got.key_fit.benign if "tied to" in why} == dropped
    with torch.no_grad():
        a, b = ref.run(), got.run()
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
