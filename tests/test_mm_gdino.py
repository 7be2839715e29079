"""MM-GroundingDINO / LLMDet checkpoints as MMDetection writes them, replayed on transformers'
MMGroundingDinoForObjectDetection (nanscope.stacks.transformers.mm_keys / mm_loading).

The mmdet file is made from a tiny MMGroundingDinoForObjectDetection by an inverse map written here from
MMDetection's module names (not from nanscope's map): Swin's qkv concatenated, patch-merging channels put
back in mmdet's Unfold order with mmdet's own swin2mmdet functions, nn.MultiheadAttention in_proj, per-layer
heads as `bbox_head.*_branches`, the encoder's head as the last branch.
"""

from __future__ import annotations

import re

import pytest
import torch

from nanscope.errors import CheckpointError

SWIN = "model.backbone.conv_encoder.model.swin."


# --- mmdet's tools/model_converters/swin2mmdet.py (official Swin order -> mmdet's Unfold order) -------------
def swin_to_mmdet_reduction(x: torch.Tensor) -> torch.Tensor:
    out_channel, in_channel = x.shape
    x = x.reshape(out_channel, 4, in_channel // 4)
    return x[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_channel, in_channel)


def swin_to_mmdet_norm(x: torch.Tensor) -> torch.Tensor:
    in_channel = x.shape[0]
    x = x.reshape(4, in_channel // 4)
    return x[[0, 2, 1, 3], :].transpose(0, 1).reshape(in_channel)


def to_mmdet(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers MMGroundingDino state dict -> MMDetection GroundingDINO key names (independent inverse)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    L = model.config.decoder_layers
    n_convs = len(model.config.backbone_config.out_features)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("model.decoder.class_embed.") or k.startswith("model.decoder.bbox_embed.") or \
                k.startswith(SWIN + "layernorm."):
            continue  # duplicates of the top-level heads / Swin's unused final norm: mmdet has neither
        if k.startswith(SWIN):
            r = k[len(SWIN):]
            r = r.replace("embeddings.patch_embeddings.projection.", "patch_embed.projection.")
            r = r.replace("embeddings.norm.", "patch_embed.norm.").replace("encoder.layers.", "stages.")
            if m := re.match(r"(stages\.\d+\.blocks\.\d+\.)attention\.([qkv])_proj\.(\w+)$", r):
                qkv.setdefault(f"backbone.{m.group(1)}attn.w_msa.qkv.{m.group(3)}", {})[m.group(2)] = v
                continue
            r = r.replace("attention.o_proj.", "attn.w_msa.proj.")
            r = r.replace("attention.relative_position_bias.", "attn.w_msa.")
            r = r.replace("layernorm_before.", "norm1.").replace("layernorm_after.", "norm2.")
            r = r.replace("mlp.fc1.", "ffn.layers.0.0.").replace("mlp.fc2.", "ffn.layers.1.")
            if "downsample.reduction" in r:
                v = swin_to_mmdet_reduction(v)
            elif "downsample.norm" in r:
                v = swin_to_mmdet_norm(v)
            out["backbone." + r] = v
        elif m := re.match(r"model\.backbone\.conv_encoder\.model\.hidden_states_norms\.stage(\d)\.(\w+)$", k):
            out[f"backbone.norm{int(m.group(1)) - 1}.{m.group(2)}"] = v
        elif m := re.match(r"model\.input_proj_vision\.(\d+)\.([01])\.(\w+)$", k):
            i, part = int(m.group(1)), "conv" if m.group(2) == "0" else "gn"
            out[f"neck.convs.{i}.{part}.{m.group(3)}" if i < n_convs
                else f"neck.extra_convs.{i - n_convs}.{part}.{m.group(3)}"] = v
        elif k.startswith("model.text_backbone."):
            out["language_model.language_backbone.body.model." + k[len("model.text_backbone."):]] = v
        elif k.startswith("model.text_projection."):
            out["text_feat_map." + k.split(".")[-1]] = v
        elif m := re.match(r"model\.encoder\.layers\.(\d+)\.(\w+)\.(.+)$", k):
            i, part, rest = m.groups()
            if part == "fusion_layer":
                rest = {"vision_param": "gamma_v", "text_param": "gamma_l"}.get(rest, rest)
                rest = rest.replace("layer_norm_vision", "layer_norm_v").replace("layer_norm_text", "layer_norm_l")
                rest = rest.replace("vision_proj", "v_proj").replace("text_proj", "l_proj")
                out[f"encoder.fusion_layers.{i}.{rest}"] = v
            elif part == "deformable_layer":
                rest = rest.replace("self_attn_layer_norm", "norms.0").replace("final_layer_norm", "norms.1")
                rest = rest.replace("fc1", "ffn.layers.0.0").replace("fc2", "ffn.layers.1")
                out[f"encoder.layers.{i}.{rest}"] = v
            else:  # text_enhancer_layer
                if mm := re.match(r"self_attn\.(query|key|value)\.(\w+)$", rest):
                    qkv.setdefault(f"encoder.text_layers.{i}.self_attn.attn.in_proj_{mm.group(2)}", {})[mm.group(1)] = v
                    continue
                rest = rest.replace("self_attn.out_proj", "self_attn.attn.out_proj")
                rest = rest.replace("layer_norm_before", "norms.0").replace("layer_norm_after", "norms.1")
                rest = rest.replace("fc1", "ffn.layers.0.0").replace("fc2", "ffn.layers.1")
                out[f"encoder.text_layers.{i}.{rest}"] = v
        elif m := re.match(r"model\.decoder\.layers\.(\d+)\.(.+)$", k):
            i, rest = m.groups()
            if mm := re.match(r"(self_attn|encoder_attn_text)\.(query|key|value)\.(\w+)$", rest):
                name = "self_attn" if mm.group(1) == "self_attn" else "cross_attn_text"
                qkv.setdefault(f"decoder.layers.{i}.{name}.attn.in_proj_{mm.group(3)}", {})[mm.group(2)] = v
                continue
            rest = rest.replace("encoder_attn_text.out_proj", "cross_attn_text.attn.out_proj")
            rest = rest.replace("self_attn.out_proj", "self_attn.attn.out_proj")
            rest = rest.replace("encoder_attn_text_layer_norm", "norms.1").replace("encoder_attn_layer_norm", "norms.2")
            rest = rest.replace("self_attn_layer_norm", "norms.0").replace("final_layer_norm", "norms.3")
            rest = rest.replace("encoder_attn.", "cross_attn.")
            rest = rest.replace("fc1", "ffn.layers.0.0").replace("fc2", "ffn.layers.1")
            out[f"decoder.layers.{i}.{rest}"] = v
        elif k.startswith("model.decoder.layer_norm."):
            out["decoder.norm." + k.split(".")[-1]] = v
        elif k.startswith("model.decoder.reference_points_head."):
            out["decoder.ref_point_head." + k[len("model.decoder.reference_points_head."):]] = v
        elif m := re.match(r"class_embed\.(\d+)\.bias$", k):
            out[f"bbox_head.cls_branches.{m.group(1)}.bias"] = v.reshape(1)  # nn.Parameter(torch.Tensor([b]))
        elif m := re.match(r"bbox_embed\.(\d+)\.layers\.(\d)\.(\w+)$", k):
            out[f"bbox_head.reg_branches.{m.group(1)}.{2 * int(m.group(2))}.{m.group(3)}"] = v
        elif k == "model.encoder_output_class_embed.bias":
            out[f"bbox_head.cls_branches.{L}.bias"] = v.reshape(1)
        elif m := re.match(r"model\.encoder_output_bbox_embed\.layers\.(\d)\.(\w+)$", k):
            out[f"bbox_head.reg_branches.{L}.{2 * int(m.group(1))}.{m.group(2)}"] = v
        else:
            out[{"model.level_embed": "level_embed", "model.query_position_embeddings.weight": "query_embedding.weight",
                 "model.enc_output.weight": "memory_trans_fc.weight", "model.enc_output.bias": "memory_trans_fc.bias",
                 "model.enc_output_norm.weight": "memory_trans_norm.weight",
                 "model.enc_output_norm.bias": "memory_trans_norm.bias"}[k]] = v
    for k, parts in qkv.items():
        out[k] = torch.cat([parts[n] for n in (("q", "k", "v") if "w_msa" in k else ("query", "key", "value"))])
    out["dn_query_generator.label_embedding.weight"] = torch.randn(256, model.config.d_model)  # training only
    return out


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    """A tiny MMGroundingDinoForObjectDetection, its text encoder folder (tokenizer + BERT config.json)."""
    from nanscope.stacks.transformers.demo import tiny_model, write_tokenizer

    folder = tmp_path_factory.mktemp("mm")
    tok = write_tokenizer(folder / "bert")
    model = tiny_model(len(tok), mm=True, seed=3)
    with torch.no_grad():  # distinct heads per layer and non-default biases, as after fine-tuning
        for i, head in enumerate(model.class_embed):
            head.bias.fill_(-4.6 + 0.3 * i)
        model.model.encoder_output_class_embed.bias.fill_(-2.0)
        model.bbox_embed[1].layers[2].bias.add_(0.05)
    model.config.text_config.to_json_file(str(folder / "bert" / "config.json"))
    return folder, model, tok


def _cfg_text(bert: str) -> str:
    return ("_base_ = []\nlang_model_name = %r\nmodel = dict(type='GroundingDINO', num_queries=900,\n"
            "    language_model=dict(type='BertModel', name=lang_model_name, max_tokens=256),\n"
            "    bbox_head=dict(type='GroundingDINOHead', contrastive_cfg=dict(max_text_len=256, log_scale='auto', "
            "bias=True)))\nwork_dir = os.path.join('runs', 'x')\n" % bert)


def _mmengine_file(path, state, cfg_text):
    """A checkpoint as MMEngine's Runner writes it, with real mmengine objects."""
    import numpy as np
    from mmengine.config import ConfigDict
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint

    hub = MessageHub.get_instance(f"nanscope-test-{path.name}")
    hub.update_scalar("train/loss", 1.25)
    hub.update_scalar("train/lr", np.float64(1e-4))
    hub.update_info("iter", 12)
    p = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(p.parameters())
    p(torch.ones(1, 2)).sum().backward()
    opt.step()
    save_checkpoint({"meta": {"epoch": 1, "iter": 12, "cfg": cfg_text, "seed": np.int64(7),
                              "dataset_meta": {"classes": ("cat", "dog")}, "mmengine_version": "0.10.7"},
                     "state_dict": state, "message_hub": hub.state_dict(), "optimizer": opt.state_dict(),
                     "param_schedulers": [ConfigDict(type="MultiStepLR", milestones=[8, 11])]}, str(path))


def _inputs(tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = tok(["cat . dog .", "a photo of a zebra next to a red car ."], padding="longest", return_tensors="pt")
    return {"pixel_values": torch.randn(2, 3, 224, 224, generator=g), "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"], "token_type_ids": enc["token_type_ids"]}


def test_mmengine_checkpoint_replays_equal_without_trust(mm, tmp_path):
    from nanscope.stacks import stack_for_checkpoint

    folder, model, tok = mm
    p = tmp_path / "epoch_1.pth"
    _mmengine_file(p, to_mmdet(model), _cfg_text(str(folder / "bert")))
    stack = stack_for_checkpoint(p)
    assert stack.name == "transformers"
    loaded = stack.load(p, hash_checkpoint=False)
    assert type(loaded.model).__name__ == "MMGroundingDinoForObjectDetection"
    fit = loaded.key_fit
    assert not fit.missing and not fit.unexpected and not fit.mismatched, fit
    assert "dn_query_generator.label_embedding.weight" in {k for k, _ in fit.benign}
    notes = " ".join(fit.notes)
    assert "message_hub (dict of HistoryBuffer records)" in notes and "optimizer" in notes
    assert "work_dir" in notes  # the config line that is code, not data, is named
    with torch.no_grad():
        a, b = model(**_inputs(tok)), loaded.model(**_inputs(tok))
    assert torch.allclose(a.logits, b.logits, atol=1e-6, equal_nan=True)
    assert torch.isinf(a.logits).sum() == torch.isinf(b.logits).sum() > 0  # the -inf padding is the model's
    assert torch.allclose(a.pred_boxes, b.pred_boxes, atol=1e-6)


def test_bare_state_dict_with_mmdet_config(mm, tmp_path):
    from nanscope.stacks import get_stack

    folder, model, tok = mm
    cfg = tmp_path / "grounding_dino_swin-t_finetune.py"
    cfg.write_text(_cfg_text(str(folder / "bert")))
    p = tmp_path / "bare.pth"
    torch.save(to_mmdet(model), p)
    loaded = get_stack("hf").load(p, config=cfg, hash_checkpoint=False)
    with torch.no_grad():
        assert torch.allclose(model(**_inputs(tok, 1)).logits, loaded.model(**_inputs(tok, 1)).logits, atol=1e-6,
                              equal_nan=True)


@pytest.mark.parametrize("damage", ["deleted", "misshaped", "stray"])
def test_damaged_key_is_ns306_naming_it(mm, tmp_path, damage):
    from nanscope.analyzers.checkpoint_fit import checkpoint_fit
    from nanscope.stacks import get_stack

    folder, model, _ = mm
    state = to_mmdet(model)
    key = "decoder.layers.1.ffn.layers.0.0.weight"
    if damage == "deleted":
        del state[key]
    elif damage == "misshaped":
        state[key] = state[key][:, :-1]
    else:  # a key that maps nowhere keeps its mmdet name
        key = "bbox_head.extra_branch.0.weight"
        state[key] = torch.ones(2, 2)
    p = tmp_path / f"{damage}.pth"
    _mmengine_file(p, state, _cfg_text(str(folder / "bert")))
    fit = get_stack("hf").load(p, hash_checkpoint=False).key_fit
    hf_key = "model.decoder.layers.1.fc1.weight" if damage != "stray" else key
    where = {"deleted": fit.missing, "misshaped": [m[0] for m in fit.mismatched], "stray": fit.unexpected}[damage]
    assert list(where) == [hf_key]
    from types import SimpleNamespace

    (f,) = checkpoint_fit(SimpleNamespace(key_fit=fit))
    assert f.code == "NS306" and hf_key in {w["param"] for w in f.where}
    if damage == "misshaped":  # the user's own key name is said too
        assert f"{hf_key} is the file's {key}" in f.message


def test_other_pickled_class_is_refused_naming_it(mm, tmp_path):
    import pathlib

    from nanscope.stacks import get_stack

    folder, model, _ = mm
    p = tmp_path / "odd.pth"
    torch.save({"meta": {"work_dir": pathlib.PurePosixPath("/runs/x")}, "state_dict": to_mmdet(model)}, p)
    with pytest.raises(CheckpointError, match=r"pathlib\.PurePosixPath.*--trust-checkpoint"):
        get_stack("hf").load(p, hash_checkpoint=False)


def test_learned_logit_scale_is_refused(mm, tmp_path):
    from nanscope.stacks import get_stack

    _, model, _ = mm
    state = to_mmdet(model)
    state["bbox_head.cls_branches.0.log_scale"] = torch.tensor([0.0])
    p = tmp_path / "scaled.pth"
    torch.save({"state_dict": state}, p)
    with pytest.raises(CheckpointError, match=r"cls_branches\.0\.log_scale.*1/sqrt\(d\)"):
        get_stack("hf").load(p, hash_checkpoint=False)


def test_demo_on_mm_grounding_dino(tmp_path, capsys):
    """The unmasked loss on MM-GroundingDINO's -inf padding is NS101; verify-fix (mmdet preset) says FIXED."""
    import json

    from nanscope.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--stack", "hf-mm", "--out", str(out), "--no-html"]) == 0
    text = capsys.readouterr().out
    verdicts = [line for line in text.splitlines() if line.startswith("nanscope ")]
    assert verdicts[0].startswith("nanscope inspect: BROKEN")
    assert verdicts[1].startswith("nanscope verify-fix: FIXED")
    findings = {m.group(1) for m in (re.match(r"\s*(?:cause \d+: |note: )?(NS\d{3}) ", ln) for ln in text.splitlines()) if m}
    assert {"NS110", "NS102", "NS101", "NS001", "NS111", "NS113"} <= findings  # as on GroundingDino
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["model_type"] == "mm-grounding-dino" and cfg["architectures"] == ["MMGroundingDinoForObjectDetection"]
    assert "NaiveCriterion(preset='mmdet')" in text  # MM-GroundingDINO's default preset is MMDetection's


# --- MMDetection 3.x, written from its source: ContrastiveEmbed (grounding_dino_layers.py), BinaryFocalLossCost
# + BBoxL1Cost(xywh) + IoUCost(giou) in HungarianAssigner, GroundingDINOHead.loss_by_feat_single,
# py_sigmoid_focal_loss, L1Loss, GIoULoss, weight_reduce_loss (sum / (avg_factor + float32 eps)). ------------
EPS32 = torch.finfo(torch.float32).eps


def mmdet_contrastive(visual, text, text_token_mask, bias, max_text_len=256, log_scale="auto"):
    res = visual @ text.transpose(-1, -2)
    if log_scale == "auto":
        res = res / (visual.shape[-1] ** 0.5)
    res = res + bias
    res.masked_fill_(~text_token_mask[:, None, :], float("-inf"))
    new_res = torch.full((*res.shape[:-1], max_text_len), float("-inf"))
    new_res[..., :res.shape[-1]] = res
    return new_res


def _xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _giou(a, b):  # [N,4] x [M,4] xyxy -> [N, M]
    from torchvision.ops import generalized_box_iou

    return generalized_box_iou(a, b)


def mmdet_assign(scores, boxes, gt_boxes, gt_maps, text_mask, alpha=0.25, gamma=2.0, eps=1e-12):
    from scipy.optimize import linear_sum_assignment

    keep = torch.nonzero(text_mask).squeeze(-1)
    p = scores[:, keep].sigmoid()
    gt = gt_maps[:, keep].float()
    neg_cost = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos_cost = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    cls_cost = (torch.einsum("nc,mc->nm", pos_cost, gt) + torch.einsum("nc,mc->nm", neg_cost, 1 - gt)) * 2.0
    l1_cost = torch.cdist(boxes, gt_boxes, p=1) * 5.0
    iou_cost = -_giou(_xyxy(boxes), _xyxy(gt_boxes)) * 2.0
    rows, cols = linear_sum_assignment((cls_cost + l1_cost + iou_cost).detach().numpy())
    return torch.as_tensor(rows), torch.as_tensor(cols)


def mmdet_loss_by_feat_single(cls_scores, bbox_preds, gts, text_masks, max_text_len=256):
    labels_l, weights_l, bt_l, bw_l, num_pos = [], [], [], [], 0
    for i, (scores, boxes) in enumerate(zip(cls_scores, bbox_preds)):
        gt_maps = (gts[i]["positive_map"] > 0).float()  # binarized positive maps
        q = scores.shape[0]
        rows, cols = mmdet_assign(scores, boxes, gts[i]["boxes"], gt_maps, text_masks[i])
        labels = torch.zeros(q, max_text_len)
        labels[rows] = gt_maps[cols]
        bt, bw = torch.zeros(q, 4), torch.zeros(q, 4)
        bt[rows], bw[rows] = gts[i]["boxes"][cols], 1.0
        labels_l.append(labels), weights_l.append(torch.ones(q)), bt_l.append(bt), bw_l.append(bw)
        num_pos += len(rows)
    labels, label_weights = torch.stack(labels_l), torch.stack(weights_l)
    bbox_targets, bbox_weights = torch.cat(bt_l), torch.cat(bw_l)
    tm = torch.zeros(text_masks.size(0), max_text_len, dtype=text_masks.dtype)
    tm[:, :text_masks.size(1)] = text_masks
    text_mask = (tm > 0).unsqueeze(1).repeat(1, cls_scores.size(1), 1)
    scores = torch.masked_select(cls_scores, text_mask).contiguous()
    labels = torch.masked_select(labels, text_mask)
    label_weights = torch.masked_select(label_weights[..., None].repeat(1, 1, text_mask.size(-1)), text_mask)
    cls_avg_factor = max(float(num_pos), 1.0)  # one process: reduce_mean is the identity
    p = scores.sigmoid()
    one_minus_pt = (1 - p) * labels + p * (1 - labels)
    focal_weight = (0.25 * labels + 0.75 * (1 - labels)) * one_minus_pt.pow(2.0)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, labels, reduction="none") * focal_weight
    loss_cls = (loss * label_weights).sum() / (cls_avg_factor + EPS32) * 1.0
    num_total_pos = max(float(num_pos), 1.0)
    preds = bbox_preds.reshape(-1, 4)
    loss_bbox = (torch.abs(preds - bbox_targets) * bbox_weights).sum() / (num_total_pos + EPS32) * 5.0
    giou = torch.diag(_giou(_xyxy(preds), _xyxy(bbox_targets)))
    loss_iou = ((1 - giou) * bbox_weights.mean(-1)).sum() / (num_total_pos + EPS32) * 2.0
    return loss_cls, loss_bbox, loss_iou


def test_mmdet_preset_equals_mmdetection_head_with_learned_bias(tmp_path):
    """The MM model's logits rebuilt with MMDetection's ContrastiveEmbed (x @ t / sqrt(d) + learned bias) and
    its loss_by_feat: nanscope's mmdet preset (the default for this model) gives the same three terms."""
    from nanscope.criterion.set_criterion import SetCriterion
    from nanscope.replay.session import prepare
    from nanscope.stacks.transformers.demo import write_hf_demo

    files = write_hf_demo(tmp_path, mm=True, long=False)
    replay = prepare(files.model, files.batch, hash_checkpoint=False)
    det = replay.model
    assert replay.stack.preset_for(det) == "mmdet"
    with torch.no_grad():
        for i, head in enumerate(det.class_embed):  # a learned bias per layer, as MM-GroundingDINO trains it
            head.bias.fill_(-4.6 + 0.5 * i)
    seen = {}

    def grab(_m, args, kwargs, out):
        seen.update(vision=kwargs["vision_hidden_state"], text=kwargs["text_hidden_state"],
                    mask=kwargs["text_token_mask"], out=out)

    h = det.class_embed[-1].register_forward_hook(grab, with_kwargs=True)
    try:
        rec = replay.forward(detach=True)
    finally:
        h.remove()
    outputs, targets = rec.to_outputs(), replay.targets()
    ref_logits = mmdet_contrastive(seen["vision"], seen["text"], seen["mask"], det.class_embed[-1].bias)
    assert torch.equal(torch.isinf(ref_logits), torch.isinf(outputs["pred_logits"]))
    torch.testing.assert_close(ref_logits, outputs["pred_logits"], rtol=0, atol=1e-5)
    ref = mmdet_loss_by_feat_single(ref_logits, outputs["pred_boxes"], targets, seen["mask"])
    crit = SetCriterion("mmdet", impl="masked_select", aux_loss=False, enc_loss=False)
    ours = crit(outputs, targets)
    for name, r in zip(("loss_ce", "loss_bbox", "loss_giou"), ref):
        torch.testing.assert_close(ours[name] * crit.weight_dict[name], r, rtol=1e-5, atol=1e-6, msg=name)


def test_cli_inspect_on_an_mmengine_checkpoint(mm, tmp_path, capsys):
    """`nanscope inspect epoch_N.pth batch.pt`: no --stack, no --config, no --trust-checkpoint."""
    from nanscope.cli import main
    from nanscope.stacks.groundingdino.demo import demo_batch

    folder, model, _ = mm
    p, batch = tmp_path / "epoch_1.pth", tmp_path / "batch.pt"
    _mmengine_file(p, to_mmdet(model), _cfg_text(str(folder / "bert")))
    torch.save(demo_batch(0, long=False), batch)
    capsys.readouterr()
    code = main(["inspect", str(p), str(batch), "--criterion", "nanscope.criterion:NaiveCriterion"])
    text = capsys.readouterr().out
    assert code == 1, text
    assert re.search(r"NS101 error", text) and "NS306 info" in text
    assert "MMGroundingDinoForObjectDetection" in text and "message_hub (dict of HistoryBuffer records)" in text


def test_watch_dump_of_an_mm_model_replays(mm, tmp_path, capsys):
    """nanscope.watch on MMGroundingDinoForObjectDetection training with its own loss: a NaN pixel makes the
    matcher raise, the dump holds the model's config, and `nanscope inspect DUMP` rebuilds the MM model."""
    import json

    import nanscope
    from nanscope.cli import main
    from nanscope.stacks.transformers.stack import set_tokenizer

    import copy

    folder, original, tok = mm
    model = type(original)(copy.deepcopy(original.config))  # a training copy: the fixture's model stays as it is
    model.load_state_dict(original.state_dict())
    model.config._name_or_path = str(folder / "bert")  # where the dump finds the tokenizer
    set_tokenizer(model, tok)
    model.train()
    dumps = tmp_path / "dumps"
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.2, 0.3]])},
              {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    with pytest.raises(ValueError), pytest.warns(RuntimeWarning):
        with nanscope.watch(model, dump_dir=dumps) as watcher:
            for step in range(2):
                enc = tok(["cat . dog .", "cat . dog ."], padding="longest", return_tensors="pt")
                pv = torch.randn(2, 3, 224, 224)
                if step == 1:
                    pv[1, :, 7, 9] = float("nan")
                batch = {"pixel_values": pv, **enc, "labels": labels}
                out = model(**batch)
                watcher.check(step, out.loss_dict, batch)
                out.loss.backward()
    (dump,) = sorted(dumps.glob("step*-rank0"))
    manifest = json.loads((dump / "manifest.json").read_text())
    assert manifest["stack"]["model_class"] == "MMGroundingDinoForObjectDetection"
    assert manifest["stack"]["hf_config"]["model_type"] == "mm-grounding-dino"
    capsys.readouterr()
    assert main(["inspect", str(dump), "--json", str(tmp_path / "dump.json")]) == 1
    result = json.loads((tmp_path / "dump.json").read_text())
    assert result["inputs"]["model_class"] == "MMGroundingDinoForObjectDetection"
    assert result["findings"][0]["code"] == "NS304"


def test_plain_mmdet_groundingdino_is_not_replayed_as_mm(mm, tmp_path):
    """Without the learned bias the head has no 1/sqrt(d) either (contrastive_cfg off): not this model."""
    from nanscope.stacks import get_stack

    _, model, _ = mm
    state = {k: v for k, v in to_mmdet(model).items() if not k.startswith("bbox_head.cls_branches.")}
    p = tmp_path / "plain.pth"
    torch.save({"state_dict": state}, p)
    cfg = tmp_path / "plain.py"
    cfg.write_text("model = dict(type='GroundingDINO')\n")
    with pytest.raises(CheckpointError, match=r"not an MM-GroundingDINO state dict.*groundingdino-py"):
        get_stack("hf").load(p, config=cfg, hash_checkpoint=False)
