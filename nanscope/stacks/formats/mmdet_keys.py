"""MMDetection GroundingDINO checkpoints under groundingdino-py's key names.

MMDetection 3.x converts groundingdino's checkpoints with `tools/model_converters/groundingdino_to_mmdet.py`;
this is that mapping run backwards (mmdet -> groundingdino):

    backbone.stages.N.blocks.M.attn.w_msa.*   backbone.0.layers.N.blocks.M.attn.*   (Swin)
    ...ffn.layers.0.0 / ffn.layers.1          ...mlp.fc1 / mlp.fc2
    ...downsample.reduction / .norm           the same, channels re-ordered back (mmdet's Unfold order)
    language_model.language_backbone.body.model.*   bert.*
    text_feat_map                             feat_map
    neck.convs.{i}.conv / .gn                 input_proj.{i}.0 / .1;  neck.extra_convs.0 -> input_proj.{#convs}
    level_embed, query_embedding              transformer.level_embed, transformer.tgt_embed
    encoder.* (norms.{0,1}, ffn)              transformer.encoder.* (norm1, norm2, linear1, linear2);
                                              text_layers' self_attn.attn -> self_attn
    memory_trans_fc / memory_trans_norm       transformer.enc_output / enc_output_norm
    decoder.* (norms.{0,1,2,3}, ffn)          transformer.decoder.* (norm2, catext_norm, norm1, norm3, linear1/2);
                                              cross_attn_text.attn -> ca_text, self_attn.attn -> self_attn
    bbox_head.reg_branches.{i}.{2j}           bbox_embed.{i}.layers.{j} (and transformer.decoder.bbox_embed.{i});
                                              the last branch (index = decoder layers) is the encoder's
                                              transformer.enc_out_bbox_embed
    dn_query_generator.label_embedding        label_enc (training-only)

MM-GroundingDINO's heads (`bbox_head.cls_branches.{i}.bias` / `.log_scale`: a learned bias and logit scale per
layer) have no counterpart in groundingdino-py's `ContrastiveEmbed`: `mm_grounding_dino_keys` finds them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

MMDET_PREFIXES = ("backbone.stages.", "bbox_head.reg_branches.", "language_model.language_backbone.", "neck.convs.",
                  "memory_trans_fc.", "query_embedding.")
_PERM = [0, 2, 1, 3]  # mmdet's nn.Unfold order of the four 2x2 patch-merging neighbours vs Swin's concat order

# Whole prefixes that only change their name.
_RENAMED = (
    ("language_model.language_backbone.body.model.", "bert."),
    ("text_feat_map.", "feat_map."),
    ("query_embedding.", "transformer.tgt_embed."),
    ("memory_trans_fc.", "transformer.enc_output."),
    ("memory_trans_norm.", "transformer.enc_output_norm."),
    ("dn_query_generator.label_embedding.", "label_enc."),
)
_ENC_NORMS = {"0": "norm1", "1": "norm2", "2": "norm3"}
_DEC_NORMS = {"0": "norm2", "1": "catext_norm", "2": "norm1", "3": "norm3"}


def is_mmdet_state(state: Mapping[str, object]) -> bool:
    return sum(k.startswith(MMDET_PREFIXES) for k in state) >= 2


def mm_grounding_dino_keys(state: Mapping[str, object]) -> list[str]:
    """MM-GroundingDINO's learned contrastive bias / logit scale keys (none in plain mmdet GroundingDINO)."""
    return sorted(k for k in state if re.match(r"bbox_head\.cls_branches\.\d+\.(bias|log_scale)$", k))


def unfold_to_swin_reduction(x: torch.Tensor) -> torch.Tensor:
    """[out, 4C] patch-merging reduction weight from mmdet's Unfold channel order to Swin's concat order."""
    out_ch, in_ch = x.shape
    return x.reshape(out_ch, in_ch // 4, 4).transpose(1, 2)[:, _PERM, :].reshape(out_ch, in_ch)


def unfold_to_swin_norm(x: torch.Tensor) -> torch.Tensor:
    """[4C] patch-merging norm weight or bias, same re-ordering."""
    (in_ch,) = x.shape
    return x.reshape(in_ch // 4, 4).transpose(0, 1)[_PERM, :].reshape(in_ch)


def _ffn(k: str) -> str:
    return k.replace(".ffn.layers.0.0.", ".linear1.").replace(".ffn.layers.1.", ".linear2.")


def _backbone(k: str, v: torch.Tensor) -> tuple[str, torch.Tensor]:
    k = "backbone.0." + k[len("backbone."):]
    k = k.replace(".patch_embed.projection.", ".patch_embed.proj.").replace(".drop_after_pos.", ".pos_drop.")
    if k.startswith("backbone.0.stages."):
        k = "backbone.0.layers." + k[len("backbone.0.stages."):]
        k = k.replace(".ffn.layers.0.0.", ".mlp.fc1.").replace(".ffn.layers.1.", ".mlp.fc2.")
        k = k.replace(".attn.w_msa.", ".attn.")
        if ".downsample.reduction." in k:
            v = unfold_to_swin_reduction(v)
        elif ".downsample.norm." in k:
            v = unfold_to_swin_norm(v)
    return k, v


def _encoder(k: str) -> str:
    k = "transformer." + _ffn(k)
    k = re.sub(r"\.norms\.(\d)\.", lambda m: f".{_ENC_NORMS[m.group(1)]}.", k)
    if ".text_layers." in k:
        k = k.replace(".self_attn.attn.", ".self_attn.")
    return k


def _decoder(k: str) -> str:
    k = "transformer." + _ffn(k)
    k = re.sub(r"\.norms\.(\d)\.", lambda m: f".{_DEC_NORMS[m.group(1)]}.", k)
    return k.replace(".cross_attn_text.attn.", ".ca_text.").replace(".self_attn.attn.", ".self_attn.")


def to_groundingdino(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmdet GroundingDINO state dict under groundingdino-py's names; keys it does not know pass unchanged."""
    reg = [int(m.group(1)) for k in state if (m := re.match(r"bbox_head\.reg_branches\.(\d+)\.", k))]
    enc_branch = max(reg) if reg else -1  # mmdet keeps num_decoder_layers + 1 branches, the encoder's last
    convs = {int(m.group(1)) for k in state if (m := re.match(r"neck\.convs\.(\d+)\.", k))}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        renamed = next((new + k[len(old):] for old, new in _RENAMED if k.startswith(old)), None)
        if renamed is not None:
            k = renamed
        elif k.startswith("backbone."):
            k, v = _backbone(k, v)
        elif m := re.match(r"neck\.(convs|extra_convs)\.(\d+)\.(conv|gn)\.(.+)$", k):
            i = int(m.group(2)) + (len(convs) if m.group(1) == "extra_convs" else 0)
            k = f"input_proj.{i}.{0 if m.group(3) == 'conv' else 1}.{m.group(4)}"
        elif k == "level_embed":
            k = "transformer.level_embed"
        elif k.startswith("encoder."):
            k = _encoder(k)
        elif k.startswith("decoder."):
            k = _decoder(k)
        elif m := re.match(r"bbox_head\.reg_branches\.(\d+)\.(\d+)\.(.+)$", k):
            i, j, p = int(m.group(1)), int(m.group(2)) // 2, m.group(3)
            if i == enc_branch:
                k = f"transformer.enc_out_bbox_embed.layers.{j}.{p}"
            else:
                out[f"transformer.decoder.bbox_embed.{i}.layers.{j}.{p}"] = v
                k = f"bbox_embed.{i}.layers.{j}.{p}"
        out[k] = v
    return out


def box_heads_differ(state: Mapping[str, torch.Tensor]) -> float:
    """The largest difference between the per-layer box heads `bbox_embed.{i}` of a groundingdino state
    dict (0.0 when they are equal, or when there is only one); also under a training wrapper's prefix
    (`model.bbox_embed.{i}` in a Lightning .ckpt), never the decoder's own references to them."""
    heads: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for k, v in state.items():
        if (m := re.match(r"((?:[^.]+\.){0,3}?)bbox_embed\.(\d+)\.(.+)$", k)) and not m.group(1).endswith("decoder."):
            heads.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = v
    diff = 0.0
    for per_layer in heads.values():
        first = per_layer[min(per_layer)]
        for v in per_layer.values():
            if v.shape == first.shape:
                diff = max(diff, float((v.float() - first.float()).abs().max()))
    return diff
