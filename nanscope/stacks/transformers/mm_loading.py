"""An MMDetection MM-GroundingDINO / LLMDet `.pth` as transformers' `MMGroundingDinoForObjectDetection`.

No conversion step and no mmdet: the file is read under `weights_only` (MMEngine's pickled records
allow-listed, `nanscope.stacks.formats.mmengine_records`), its keys renamed by `mm_keys.to_transformers`,
and the model's config built from the tensors' shapes, completed by the mmdet config: the one MMEngine
stored in the checkpoint's `meta['cfg']`, or `--config` (an mmdet `.py`, read as data by
`nanscope.stacks.formats.mmdet_config`). What shapes cannot tell (attention heads, sampling points, the
text encoder's heads) comes from that config, else from MM-GroundingDINO's defaults, said in the notes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanscope.errors import CheckpointError, ConfigError
from nanscope.stacks.formats.checkpoint import KeyFit, file_kind, load_into, read_checkpoint
from nanscope.stacks.formats.mmdet_config import MmdetConfig, read_config_text, read_mmdet_config
from nanscope.stacks.transformers import mm_keys

MARKERS = (b"bbox_head.cls_branches.", b"language_model.language_backbone.")  # both in an MM-GroundingDINO pickle
DEFAULT_POINTS = 4  # MultiScaleDeformableAttention num_points in every MM-GroundingDINO / LLMDet config
DEFAULT_HEAD_DIM = 64  # BERT's head size (bert-base: 768 / 12), when no text-encoder config says the heads


def is_mm_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a torch.save zip whose pickle names MM-GroundingDINO's mmdet keys (read without
    unpickling: the key names are strings in the zip's data.pkl)."""
    p = Path(path)
    try:
        if not p.is_file() or file_kind(p) != "zip":
            return False
        with zipfile.ZipFile(p) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            data = z.read(name) if name else b""
    except (OSError, zipfile.BadZipFile):
        return False
    return all(m in data for m in MARKERS)


@dataclasses.dataclass(frozen=True)
class MmLoaded:
    model: nn.Module
    config: Any  # MMGroundingDinoConfig
    fit: KeyFit
    state: dict[str, torch.Tensor]  # the file's tensors under transformers' names
    text_encoder: str | None  # the mmdet config's language_model.name (a folder or Hub name)


def _mmdet_values(obj: Any, config: Any) -> MmdetConfig | None:
    if config is not None:
        if Path(str(config)).suffix.lower() != ".py":
            raise ConfigError(f"--config {config} for an MMDetection checkpoint: expected its mmdet .py config")
        return read_mmdet_config(config)
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    text = meta.get("cfg") if isinstance(meta, Mapping) else None
    return read_config_text(text) if isinstance(text, str) else None


def _text_config(state: Mapping[str, torch.Tensor], text_encoder: str | None) -> tuple[dict[str, Any], str]:
    pre = "language_model.language_backbone.body.model."
    emb = state[pre + "embeddings.word_embeddings.weight"]
    hidden = int(emb.shape[1])
    cfg = {"model_type": "bert", "vocab_size": int(emb.shape[0]), "hidden_size": hidden,
           "num_hidden_layers": mm_keys.count_indexed(state, pre + "encoder.layer"),
           "intermediate_size": int(state[pre + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
           "max_position_embeddings": int(state[pre + "embeddings.position_embeddings.weight"].shape[0]),
           "type_vocab_size": int(state[pre + "embeddings.token_type_embeddings.weight"].shape[0])}
    own = _local_bert_config(text_encoder)
    if own.get("num_attention_heads"):
        cfg["num_attention_heads"] = int(own["num_attention_heads"])
        return cfg, f"the text encoder's heads from {text_encoder}/config.json"
    cfg["num_attention_heads"] = max(hidden // DEFAULT_HEAD_DIM, 1)
    return cfg, f"the text encoder's heads assumed {cfg['num_attention_heads']} (hidden {hidden} / 64, as BERT)"


def _local_bert_config(name: str | None) -> dict[str, Any]:
    if not name:
        return {}
    p = Path(name) / "config.json"
    if not p.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # not a Hub name
            return {}
        if not isinstance(cached, str):
            return {}
        p = Path(cached)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _heads(state: Mapping[str, torch.Tensor], key: str, levels: int, points: int, given: Any) -> int:
    if isinstance(given, int) and given > 0:
        return given
    return max(int(state[key].shape[0]) // (levels * points), 1)


def build_hf_config(state: Mapping[str, torch.Tensor], cfg: MmdetConfig | None) -> tuple[dict[str, Any], list[str], str | None]:
    """MMGroundingDinoConfig values from an mmdet MM-GroundingDINO state dict's shapes and its mmdet config;
    with the notes saying what came from where and the text encoder's name."""
    def get(path: str, default: Any = None) -> Any:
        return cfg.get(path, default) if cfg is not None else default

    try:
        proj = state["backbone.patch_embed.projection.weight"]
        embed = int(proj.shape[0])
        stages = mm_keys.count_indexed(state, "backbone.stages")
        table = [state[f"backbone.stages.{i}.blocks.0.attn.w_msa.relative_position_bias_table"] for i in range(stages)]
        levels, d_model = (int(x) for x in state["level_embed"].shape)
        outs = sorted(int(m.group(1)) + 1 for k in state if (m := re.match(r"backbone\.norm(\d+)\.weight$", k)))
        swin = {"model_type": "swin", "embed_dim": embed, "patch_size": int(proj.shape[-1]),
                "num_channels": int(proj.shape[1]),
                "depths": [mm_keys.count_indexed(state, f"backbone.stages.{i}.blocks") for i in range(stages)],
                "num_heads": [int(t.shape[1]) for t in table],
                "window_size": int(round((math.sqrt(int(table[0].shape[0])) + 1) / 2)),
                "mlp_ratio": int(state["backbone.stages.0.blocks.0.ffn.layers.0.0.weight"].shape[0]) / embed,
                "out_features": [f"stage{i}" for i in outs]}
        text_encoder = get("model.language_model.name") or get("lang_model_name")
        text, text_note = _text_config(state, text_encoder)
        enc_points = get("model.encoder.layer_cfg.self_attn_cfg.num_points", DEFAULT_POINTS)
        dec_points = get("model.decoder.layer_cfg.cross_attn_cfg.num_points", DEFAULT_POINTS)
        values = {
            "model_type": "mm-grounding-dino", "backbone_config": swin, "text_config": text,
            "d_model": d_model, "num_feature_levels": levels,
            "num_queries": int(state["query_embedding.weight"].shape[0]),
            "encoder_layers": mm_keys.count_indexed(state, "encoder.layers"),
            "decoder_layers": mm_keys.count_indexed(state, "decoder.layers"),
            "encoder_ffn_dim": int(state["encoder.layers.0.ffn.layers.0.0.weight"].shape[0]),
            "decoder_ffn_dim": int(state["decoder.layers.0.ffn.layers.0.0.weight"].shape[0]),
            "encoder_n_points": enc_points, "decoder_n_points": dec_points,
            "encoder_attention_heads": _heads(state, "encoder.layers.0.self_attn.attention_weights.weight", levels,
                                              enc_points, get("model.encoder.layer_cfg.self_attn_cfg.num_heads")),
            "decoder_attention_heads": _heads(state, "decoder.layers.0.cross_attn.attention_weights.weight", levels,
                                              dec_points, get("model.decoder.layer_cfg.cross_attn_cfg.num_heads")),
            "max_text_len": int(get("model.bbox_head.contrastive_cfg.max_text_len", 256)),
            "positional_embedding_temperature": get("model.positional_encoding.temperature", 20),
            # mmdet's heads are per-layer copies (fine-tuning unties them): build them untied
            "decoder_bbox_embed_share": False, "decoder_cls_embed_share": False,
            "two_stage": True, "embedding_init_target": True, "auxiliary_loss": True,
        }
    except KeyError as exc:
        raise CheckpointError(f"MM-GroundingDINO checkpoint lacks {exc.args[0]!r}, which nanscope reads the model's "
                              "shape from; expected a full MMDetection GroundingDINO state_dict") from None
    source = cfg.source if cfg is not None else "no mmdet config (none in meta['cfg'], no --config)"
    notes = [f"the MMGroundingDinoForObjectDetection config was built from the checkpoint's shapes and {source}; "
             f"{text_note}"]
    if cfg is None:
        notes.append(f"deformable attention assumed {DEFAULT_POINTS} sampling points (MM-GroundingDINO's); pass "
                     "--config with the mmdet .py config if yours differs")
    return values, notes, text_encoder if isinstance(text_encoder, str) else None


def load_mm_file(path: Path, *, config: Any = None, trust: bool = False, seed: int = 0) -> MmLoaded:
    """An MMDetection MM-GroundingDINO / LLMDet checkpoint file -> MMGroundingDinoForObjectDetection."""
    from nanscope.stacks.formats.mmengine_records import skipped_entries
    from nanscope.stacks.transformers.loading import build_config, harmless_keys, model_class, quiet_transformers

    obj = read_checkpoint(path, trust=trust)
    raw = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}; expected an MMEngine "
                              "checkpoint ({'meta', 'state_dict', ...}) or a bare state dict")
    state = {str(k).removeprefix("module."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not mm_keys.is_mm_state(state):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not an MM-GroundingDINO state dict (no learned contrastive bias "
            "'bbox_head.cls_branches.N.bias' next to mmdet backbone/language_model keys); a plain MMDetection "
            "GroundingDINO checkpoint replays on groundingdino-py (--stack groundingdino-py with its config)")
    scales = mm_keys.learned_scales(state)
    if scales:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has a learned logit scale per contrastive head ({', '.join(scales[:3])}: "
            "contrastive_cfg log_scale=<float>); transformers' MMGroundingDinoForObjectDetection fixes the scale to "
            "1/sqrt(d) (log_scale='auto'), so replaying it there would change every logit. nanscope replays "
            "log_scale='auto' checkpoints (MM-GroundingDINO's and LLMDet's configs) only")
    cfg_values = _mmdet_values(obj, config)
    values, notes, text_encoder = build_hf_config(state, cfg_values)
    mapped = mm_keys.to_transformers(state)
    hf_cfg = build_config(values)
    torch.manual_seed(seed)  # weights the file lacks are reported (NS306); make their init reproducible
    with quiet_transformers():
        model = model_class(hf_cfg)(hf_cfg)
    fit = load_into(model, mapped.state, source=f"checkpoint {str(path)!r}",
                    expected="MMDetection MM-GroundingDINO keys such as 'encoder.layers.0.self_attn...'")
    training = {k: why for k in mapped.unmapped if (why := next((w for p, w in mm_keys.TRAINING_ONLY.items()
                                                          if k.startswith(p)), None))}
    notes.insert(0, f"{len(state) - len(mapped.unmapped)} of {len(state)} keys were mapped from MMDetection's "
                    "MM-GroundingDINO names onto MMGroundingDinoForObjectDetection (nanscope's map, derived from "
                    "transformers' convert_mm_grounding_dino_to_hf.py; no conversion step)")
    renamed = [f"{k} is the file's {mapped.origin[k]}" for k, _, _ in fit.mismatched if mapped.origin.get(k, k) != k]
    if renamed:
        notes.append("mis-shaped under their mmdet names: " + "; ".join(renamed[:5]))
    skipped = skipped_entries(obj)
    if skipped:
        notes.append("read and left aside (training state, not weights): " + ", ".join(skipped))
    if cfg_values is not None and cfg_values.skipped:
        notes.append(f"{cfg_values.source}: not read as data (code): " + ", ".join(cfg_values.skipped[:8]))
    fit = dataclasses.replace(
        fit, unexpected=tuple(k for k in fit.unexpected if k not in training),
        benign=fit.benign + tuple(sorted(training.items())), notes=fit.notes + tuple(notes))
    return MmLoaded(model.eval(), hf_cfg, harmless_keys(model, fit), mapped.state, text_encoder)
