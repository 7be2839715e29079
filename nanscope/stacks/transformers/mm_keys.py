"""MMDetection MM-GroundingDINO / LLMDet key names -> transformers' `MMGroundingDinoForObjectDetection` (5.25).

Derived from transformers' `convert_mm_grounding_dino_to_hf.py` (`ORIGINAL_TO_CONVERTED_KEY_MAPPING` and
`preprocess_old_state`), with the Swin names of the installed transformers 5.25 (`...model.swin.encoder`,
`attention.q_proj/k_proj/v_proj/o_proj`, `attention.relative_position_bias.*`), and MMDetection's module names:

    backbone.patch_embed.projection / .norm        model.backbone.conv_encoder.model.swin.embeddings.*
    backbone.stages.i.blocks.j.attn.w_msa.qkv      ...swin.encoder.layers.i.blocks.j.attention.{q,k,v}_proj (split in 3)
    ...w_msa.proj / .relative_position_bias_table  ...attention.o_proj / .relative_position_bias.*
    ...norm1 / norm2 / ffn.layers.0.0 / ffn.layers.1   layernorm_before / layernorm_after / mlp.fc1 / mlp.fc2
    backbone.stages.i.downsample.reduction / .norm ...layers.i.downsample.* (channels re-ordered from mmdet's Unfold)
    backbone.norm{i}                               model.backbone.conv_encoder.model.hidden_states_norms.stage{i+1}
    neck.convs.i.conv / .gn; neck.extra_convs.k    model.input_proj_vision.i.0 / .1; index #convs + k
    language_model.language_backbone.body.model.*  model.text_backbone.*;  text_feat_map -> model.text_projection
    encoder.layers.i (self_attn, norms.0/1, ffn)   model.encoder.layers.i.deformable_layer.*
    encoder.text_layers.i (self_attn.attn in_proj) model.encoder.layers.i.text_enhancer_layer.* (query/key/value split)
    encoder.fusion_layers.i (gamma_v/l, attn.*)    model.encoder.layers.i.fusion_layer.*
    decoder.layers.i (self_attn, cross_attn_text, cross_attn, norms.0..3, ffn)   model.decoder.layers.i.*
    decoder.norm / decoder.ref_point_head          model.decoder.layer_norm / reference_points_head
    level_embed, query_embedding, memory_trans_fc / _norm   model.level_embed, query_position_embeddings, enc_output(_norm)
    bbox_head.cls_branches.i.bias (i < #layers)    class_embed.i.bias and model.decoder.class_embed.i.bias ([1] -> [])
    bbox_head.reg_branches.i.{0,2,4}               bbox_embed.i.layers.{0,1,2} and model.decoder.bbox_embed.i...
    bbox_head.*_branches.{#layers}                 the encoder's: model.encoder_output_class_embed / _bbox_embed

A key that matches no rule keeps its mmdet name, so the key-fit report (NS306) names it. Training-only parts
(`dn_query_generator`, LLMDet's language-model supervision `lmm.`, `connector.`, ...) are listed in `TRAINING_ONLY`.
A learned logit scale (`cls_branches.i.log_scale`) has no counterpart: transformers fixes it to 1/sqrt(d).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nanscope.stacks.formats.mmdet_keys import unfold_to_swin_norm, unfold_to_swin_reduction

SWIN = "model.backbone.conv_encoder.model.swin."
BACKBONE = "model.backbone.conv_encoder.model."
# mmdet prefixes that only training uses, with why (benign in the key-fit report)
TRAINING_ONLY = {
    "dn_query_generator.": "the denoising label embedding (training only)",
    "lmm.": "LLMDet's large language model (training-time supervision only)",
    "connector.": "LLMDet's image-to-LLM connector (training only)",
    "region_connector.": "LLMDet's region-to-LLM connector (training only)",
    "image_seperate.": "LLMDet's image separator token (training only)",
    "ref_point_head.": "LLMDet's top-level reference-point head for the LLM (training only)",
}

# (mmdet pattern, transformers replacement), applied to the first rule that matches, after `_split`.
_RULES: tuple[tuple[str, str], ...] = (
    (r"backbone\.patch_embed\.projection\.(.+)", SWIN + r"embeddings.patch_embeddings.projection.\1"),
    (r"backbone\.patch_embed\.norm\.(.+)", SWIN + r"embeddings.norm.\1"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.(q|k|v)_proj\.(.+)",
     SWIN + r"encoder.layers.\1.blocks.\2.attention.\3_proj.\4"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.proj\.(.+)", SWIN + r"encoder.layers.\1.blocks.\2.attention.o_proj.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.(relative_position_\w+)",
     SWIN + r"encoder.layers.\1.blocks.\2.attention.relative_position_bias.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm1\.(.+)", SWIN + r"encoder.layers.\1.blocks.\2.layernorm_before.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm2\.(.+)", SWIN + r"encoder.layers.\1.blocks.\2.layernorm_after.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.(.+)", SWIN + r"encoder.layers.\1.blocks.\2.mlp.fc1.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.(.+)", SWIN + r"encoder.layers.\1.blocks.\2.mlp.fc2.\3"),
    (r"backbone\.stages\.(\d+)\.downsample\.(reduction|norm)\.(.+)", SWIN + r"encoder.layers.\1.downsample.\2.\3"),
    (r"backbone\.hidden_norm\.stage(\d+)\.(.+)", BACKBONE + r"hidden_states_norms.stage\1.\2"),
    (r"neck\.proj\.(\d+)\.(0|1)\.(.+)", r"model.input_proj_vision.\1.\2.\3"),
    (r"language_model\.language_backbone\.body\.model\.(.+)", r"model.text_backbone.\1"),
    (r"text_feat_map\.(.+)", r"model.text_projection.\1"),
    (r"encoder\.fusion_layers\.(\d+)\.gamma_v", r"model.encoder.layers.\1.fusion_layer.vision_param"),
    (r"encoder\.fusion_layers\.(\d+)\.gamma_l", r"model.encoder.layers.\1.fusion_layer.text_param"),
    (r"encoder\.fusion_layers\.(\d+)\.layer_norm_v\.(.+)", r"model.encoder.layers.\1.fusion_layer.layer_norm_vision.\2"),
    (r"encoder\.fusion_layers\.(\d+)\.layer_norm_l\.(.+)", r"model.encoder.layers.\1.fusion_layer.layer_norm_text.\2"),
    (r"encoder\.fusion_layers\.(\d+)\.attn\.(values_|out_)?v_proj\.(.+)", r"model.encoder.layers.\1.fusion_layer.attn.\2vision_proj.\3"),
    (r"encoder\.fusion_layers\.(\d+)\.attn\.(values_|out_)?l_proj\.(.+)", r"model.encoder.layers.\1.fusion_layer.attn.\2text_proj.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(.+)",
     r"model.encoder.layers.\1.deformable_layer.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.norms\.0\.(.+)", r"model.encoder.layers.\1.deformable_layer.self_attn_layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.norms\.1\.(.+)", r"model.encoder.layers.\1.deformable_layer.final_layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.(.+)", r"model.encoder.layers.\1.deformable_layer.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.ffn\.layers\.1\.(.+)", r"model.encoder.layers.\1.deformable_layer.fc2.\2"),
    (r"encoder\.text_layers\.(\d+)\.self_attn\.attn\.(query|key|value)\.(.+)", r"model.encoder.layers.\1.text_enhancer_layer.self_attn.\2.\3"),
    (r"encoder\.text_layers\.(\d+)\.self_attn\.attn\.out_proj\.(.+)", r"model.encoder.layers.\1.text_enhancer_layer.self_attn.out_proj.\2"),
    (r"encoder\.text_layers\.(\d+)\.norms\.0\.(.+)", r"model.encoder.layers.\1.text_enhancer_layer.layer_norm_before.\2"),
    (r"encoder\.text_layers\.(\d+)\.norms\.1\.(.+)", r"model.encoder.layers.\1.text_enhancer_layer.layer_norm_after.\2"),
    (r"encoder\.text_layers\.(\d+)\.ffn\.layers\.0\.0\.(.+)", r"model.encoder.layers.\1.text_enhancer_layer.fc1.\2"),
    (r"encoder\.text_layers\.(\d+)\.ffn\.layers\.1\.(.+)", r"model.encoder.layers.\1.text_enhancer_layer.fc2.\2"),
    (r"decoder\.norm\.(.+)", r"model.decoder.layer_norm.\1"),
    (r"decoder\.ref_point_head\.layers\.(\d+)\.(.+)", r"model.decoder.reference_points_head.layers.\1.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn\.attn\.(query|key|value|out_proj)\.(.+)", r"model.decoder.layers.\1.self_attn.\2.\3"),
    (r"decoder\.layers\.(\d+)\.cross_attn_text\.attn\.(query|key|value|out_proj)\.(.+)",
     r"model.decoder.layers.\1.encoder_attn_text.\2.\3"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(.+)",
     r"model.decoder.layers.\1.encoder_attn.\2.\3"),
    (r"decoder\.layers\.(\d+)\.norms\.0\.(.+)", r"model.decoder.layers.\1.self_attn_layer_norm.\2"),
    (r"decoder\.layers\.(\d+)\.norms\.1\.(.+)", r"model.decoder.layers.\1.encoder_attn_text_layer_norm.\2"),
    (r"decoder\.layers\.(\d+)\.norms\.2\.(.+)", r"model.decoder.layers.\1.encoder_attn_layer_norm.\2"),
    (r"decoder\.layers\.(\d+)\.norms\.3\.(.+)", r"model.decoder.layers.\1.final_layer_norm.\2"),
    (r"decoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.(.+)", r"model.decoder.layers.\1.fc1.\2"),
    (r"decoder\.layers\.(\d+)\.ffn\.layers\.1\.(.+)", r"model.decoder.layers.\1.fc2.\2"),
    (r"level_embed", r"model.level_embed"),
    (r"query_embedding\.weight", r"model.query_position_embeddings.weight"),
    (r"memory_trans_fc\.(.+)", r"model.enc_output.\1"),
    (r"memory_trans_norm\.(.+)", r"model.enc_output_norm.\1"),
)
_COMPILED = tuple((re.compile(p + "$"), r) for p, r in _RULES)
_HEAD = re.compile(r"bbox_head\.(cls|reg)_branches\.(\d+)\.(.+)$")


def is_mm_state(state: Mapping[str, object]) -> bool:
    """An MMDetection GroundingDINO state dict whose contrastive heads have MM-GroundingDINO's learned bias."""
    return any(re.match(r"bbox_head\.cls_branches\.\d+\.bias$", k) for k in state) and \
        any(k.startswith(("backbone.", "language_model.")) for k in state)


def learned_scales(state: Mapping[str, object]) -> list[str]:
    """`cls_branches.i.log_scale` keys: a learned logit scale, which MMGroundingDinoForObjectDetection lacks."""
    return sorted(k for k in state if re.match(r"bbox_head\.cls_branches\.\d+\.log_scale$", k))


def _split(k: str, v: torch.Tensor, num_convs: int) -> list[tuple[str, torch.Tensor]]:
    """One mmdet tensor -> the (renamed-for-the-rules key, tensor) pieces: qkv split, Unfold order, indices."""
    if m := re.match(r"(backbone\.stages\.\d+\.blocks\.\d+\.attn\.w_msa\.)qkv\.(.+)$", k):
        return [(f"{m.group(1)}{n}_proj.{m.group(2)}", t) for n, t in zip("qkv", v.chunk(3))]
    if m := re.match(r"((?:encoder\.text_layers|decoder\.layers)\.\d+\.(?:self_attn|cross_attn_text)\.attn\.)in_proj_(weight|bias)$", k):
        return [(f"{m.group(1)}{n}.{m.group(2)}", t) for n, t in zip(("query", "key", "value"), v.chunk(3))]
    if re.match(r"backbone\.stages\.\d+\.downsample\.reduction\.weight$", k):
        return [(k, unfold_to_swin_reduction(v))]
    if re.match(r"backbone\.stages\.\d+\.downsample\.norm\.", k):
        return [(k, unfold_to_swin_norm(v))]
    if m := re.match(r"backbone\.norm(\d+)\.(.+)$", k):  # mmdet's norm{i} follows stage i: HF counts the stem
        return [(f"backbone.hidden_norm.stage{int(m.group(1)) + 1}.{m.group(2)}", v)]
    if m := re.match(r"neck\.(convs|extra_convs)\.(\d+)\.(conv|gn)\.(.+)$", k):
        i = int(m.group(2)) + (num_convs if m.group(1) == "extra_convs" else 0)
        return [(f"neck.proj.{i}.{0 if m.group(3) == 'conv' else 1}.{m.group(4)}", v)]
    return [(k, v)]


def _head(m: re.Match[str], v: torch.Tensor, decoder_layers: int) -> list[tuple[str, torch.Tensor]]:
    kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
    if kind == "cls":
        if rest != "bias":
            return []  # log_scale: refused before mapping (learned_scales)
        v = v.reshape(()) if v.numel() == 1 else v
        if i >= decoder_layers:
            return [("model.encoder_output_class_embed.bias", v)]
        return [(f"class_embed.{i}.bias", v), (f"model.decoder.class_embed.{i}.bias", v)]
    lm = re.match(r"(\d+)\.(.+)$", rest)
    if lm is None:
        return []
    layer, param = int(lm.group(1)) // 2, lm.group(2)  # nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)
    if i >= decoder_layers:
        return [(f"model.encoder_output_bbox_embed.layers.{layer}.{param}", v)]
    return [(f"bbox_embed.{i}.layers.{layer}.{param}", v), (f"model.decoder.bbox_embed.{i}.layers.{layer}.{param}", v)]


def count_indexed(state: Mapping[str, object], prefix: str) -> int:
    """How many `prefix.N.` entries there are (max N + 1, 0 when none)."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = [int(m.group(1)) for k in state if (m := pat.match(k))]
    return max(found) + 1 if found else 0


@dataclass(frozen=True)
class Mapped:
    state: dict[str, torch.Tensor]  # under MMGroundingDinoForObjectDetection's names
    unmapped: tuple[str, ...]  # mmdet keys that matched no rule (kept under their mmdet name: NS306 names them)
    origin: dict[str, str]  # transformers key -> the mmdet key it came from


def to_transformers(state: Mapping[str, torch.Tensor]) -> Mapped:
    """An mmdet MM-GroundingDINO / LLMDet state dict under MMGroundingDinoForObjectDetection's names."""
    decoder_layers = count_indexed(state, "decoder.layers")
    num_convs = count_indexed(state, "neck.convs")
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        if m := _HEAD.match(key):
            pieces = _head(m, value, decoder_layers) or [(key, value)]
            if pieces[0][0] == key:
                unmapped.append(key)
        else:
            pieces = []
            for k, v in _split(key, value, num_convs):
                new = next((pat.sub(rep, k) for pat, rep in _COMPILED if pat.match(k)), None)
                if new is None:
                    unmapped.append(key)
                    new = key
                pieces.append((new, v))
        for new, v in pieces:
            out[new] = v
            origin[new] = key
    return Mapped(out, tuple(unmapped), origin)
