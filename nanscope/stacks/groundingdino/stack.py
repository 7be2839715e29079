"""The groundingdino-py stack: build the real model from a config, find it inside wrappers, load and replay it.

Configs are groundingdino's own (a `.py` as shipped, or `.json`/`.yaml`), read without running them
unless trusted (`nanscope.stacks.formats.safe_config`), or the values a watch dump recorded (`ConfigValues`).
A config may carry `nanscope_swin = {embed_dim, depths, num_heads, window_size}`: the Swin backbone is
then built at that size (groundingdino only knows the five published sizes by name), which is how the
demo gets a ~4M-parameter model from the real modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch
from torch import nn

from nanscope import progress
from nanscope.errors import BatchError, ConfigError
from nanscope.stacks.base import LoadedModel, Stack, find_wrapped
from nanscope.stacks.capture import Capture
from nanscope.stacks.formats.safe_config import BASE_KEY, ConfigValues, read_values
from nanscope.stacks.groundingdino.provider import require as require_provider

DEFAULT_CONFIG = "SwinT_OGC"  # groundingdino's GroundingDINO_SwinT_OGC.py, shipped inside the package
DEFAULT_TEXT_ENCODER = "bert-base-uncased"
ConfigSource = str | os.PathLike[str] | ConfigValues | None  # a file, a dump's values, or None (SwinT-OGC)


def default_config_path() -> Path:
    """groundingdino's SwinT-OGC config inside whichever distribution provides the module."""
    return require_provider().location / "config" / "GroundingDINO_SwinT_OGC.py"


def load_config(config: ConfigSource, *, trust_py: bool = True) -> Any:
    """A groundingdino config as its `SLConfig`; `None` means SwinT-OGC, `ConfigValues` are a dump's values.

    JSON and YAML are read with safe loaders (`nanscope.stacks.formats.safe_config`); a `.py` config (or a
    `.py` `_base_`) runs only when `trust_py`, the default for a file the caller names.
    """
    require_provider()  # none installed, or two mixed in one folder: say so before groundingdino's ImportError
    from groundingdino.util.slconfig import SLConfig

    if isinstance(config, ConfigValues):
        values, name = dict(config.values), str(config)
        if BASE_KEY in values:
            raise ConfigError(f"{name} name `_base_` files; recorded config values must be complete")
    else:
        path = Path(config) if config is not None else default_config_path()
        values, name = read_values(path, trust_py=trust_py or config is None), f"config file {str(path)!r}"
    from nanscope.stacks.config_bounds import check_model_dims

    check_model_dims(values, name)  # before anything is built: hidden_dim=1e9 is refused here, not by torch
    try:
        cfg = SLConfig(values, filename=None)
    except (KeyError, TypeError) as exc:  # reserved names (filename, text, ...)
        raise ConfigError(f"{name} could not be used: {exc}") from None
    if getattr(cfg, "modelname", None) != "groundingdino":
        raise ConfigError(f"{name} has modelname={getattr(cfg, 'modelname', None)!r}; expected 'groundingdino'")
    return cfg


@contextlib.contextmanager
def _swin_size(spec: dict[str, Any] | None) -> Iterator[None]:
    """Temporarily make groundingdino build a Swin of the given size (restored on exit)."""
    if not spec:
        yield
        return
    from groundingdino.models.GroundingDINO.backbone import backbone as bb
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import SwinTransformer

    original = bb.build_swin_transformer

    def build(modelname: str, pretrain_img_size: int, **kw: Any) -> nn.Module:
        return SwinTransformer(pretrain_img_size=pretrain_img_size, **{**dict(spec), **kw})

    bb.build_swin_transformer = build
    try:
        yield
    finally:
        bb.build_swin_transformer = original


def build_model(
    config: ConfigSource = None,
    *,
    text_encoder: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, Any]:
    """Build a GroundingDINO with random detector weights. Returns `(model, cfg)`; the model is in eval mode.

    `text_encoder` is a Hugging Face name or a local folder (tokenizer + BERT weights); `overrides` set config
    values (e.g. `dec_pred_bbox_embed_share=False` for a checkpoint whose box heads were trained untied).
    """
    cfg = load_config(config)
    for key, value in (overrides or {}).items():
        setattr(cfg, key, value)
    if text_encoder is None:
        text_encoder = _text_encoder_beside(config, cfg)
    if text_encoder is not None:
        te = str(text_encoder)
        if os.sep in te or te.startswith("."):
            if not Path(te).is_dir():
                raise ConfigError(f"text encoder folder {te!r} does not exist")
            te = str(Path(te).resolve())
        cfg.text_encoder_type = te
    if seed is not None:
        torch.manual_seed(seed)
    from groundingdino.models import build_model as gd_build

    from nanscope.stacks.groundingdino import bert_compat as gdpy_bert_compat
    from nanscope.stacks._hf_progress import quiet_progress_bars

    gdpy_bert_compat.install()  # groundingdino's BERT wrapper on transformers 4.x and 5.x (see that module)
    spec = cfg.get("nanscope_swin", None)
    try:
        with contextlib.redirect_stdout(io.StringIO()), _swin_size(dict(spec) if spec else None), \
                quiet_progress_bars():
            model = gd_build(cfg)
    except Exception as exc:  # noqa: BLE001 (transformers wraps torch's refusal in several types)
        if not isinstance(exc, OSError) and _unsafe_weights(exc) is None:
            raise
        unsafe = _unsafe_weights(exc)
        if unsafe is not None:
            raise ConfigError(f"text encoder {cfg.text_encoder_type!r}: the weights cannot be read safely: {unsafe}; "
                              "nanscope loads weights only as tensors (torch's weights_only=True) and never unpickles "
                              "code. Save the text encoder again with save_pretrained (model.safetensors)") from None
        raise ConfigError(
            f"text encoder {cfg.text_encoder_type!r} could not be loaded ({str(exc).splitlines()[0]}); "
            "pass --text-encoder with a local folder holding the tokenizer and BERT weights"
        ) from None
    model.eval()
    return model, cfg


def _unsafe_weights(exc: BaseException) -> str | None:
    """What torch's weights_only load refused (a pickled class), read from the error chain; None when the error
    is something else. torch's own advice (retry with weights_only=False) is never passed on."""
    import pickle
    import re

    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, pickle.UnpicklingError) or "weights_only" in text:
            text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            return f"it pickles {m.group(1)}" if m else "it holds pickled Python objects, not plain tensors"
        seen = seen.__cause__ or seen.__context__
    return None


def swin_positions(h: int, w: int, out_indices: tuple[int, ...], levels: int) -> int:
    """Encoder positions of an HxW image: Swin's stages at strides 4, 8, 16, 32 (each rounds up), the
    returned ones, plus extra stride-2 levels up to `levels` (groundingdino's input projections)."""
    a, b, total, used = -(-h // 4), -(-w // 4), 0, 0
    for stage in range(max(out_indices) + 1):
        if stage:
            a, b = -(-a // 2), -(-b // 2)
        if stage in out_indices:
            total, used = total + a * b, used + 1
    for _ in range(levels - used):
        a, b = -(-a // 2), -(-b // 2)
        total += a * b
    return total


def find_groundingdino(model: nn.Module) -> nn.Module:
    """Return the GroundingDINO inside DDP (`module`), PEFT (`base_model.model`) or torch.compile (`_orig_mod`)."""
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

    found = find_wrapped(model, lambda m: isinstance(m, GroundingDINO))
    if found is None:
        raise ConfigError(f"no GroundingDINO module found inside {type(model).__name__}")
    return found


def resolve_text_encoder(config: ConfigSource, text_encoder: str | None) -> str | None:
    """An explicit --text-encoder wins; a relative folder named in the config is found next to the config."""
    if text_encoder is not None:
        return text_encoder
    if config is None or isinstance(config, ConfigValues):
        return None  # a dump's values: its manifest names the text encoder folder itself
    return _text_encoder_beside(config, load_config(config))


def _text_encoder_beside(config: ConfigSource, cfg: Any) -> str | None:
    """The folder a config file's relative `text_encoder_type` names next to that file, if it exists."""
    if config is None or isinstance(config, ConfigValues):
        return None
    te = str(getattr(cfg, "text_encoder_type", ""))
    candidate = Path(config).parent / te
    if te and not Path(te).is_absolute() and candidate.is_dir():
        return str(candidate)
    return None


class GroundingDinoPy(Stack):
    """IDEA-Research's groundingdino-py (and Open-GroundingDino, whose model code and keys are the same)."""

    name = "groundingdino-py"

    def __init__(self) -> None:
        self.provider = require_provider()  # NoProviderError (also an ImportError: detection skips the family)

    def owns(self, model: nn.Module) -> bool:
        try:
            self.find_model(model)
        except (ConfigError, ImportError):
            return False
        return True

    def find_model(self, model: nn.Module) -> nn.Module:
        return find_groundingdino(model)

    def claims(self, checkpoint: Path) -> bool:
        from nanscope.stacks.formats.peft import ADAPTER_CONFIG

        p = Path(checkpoint)  # a torch file (the fallback stack for single files), or a PEFT adapter folder
        return p.is_file() or (p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file())

    def load(self, checkpoint: str | os.PathLike[str], *, config: ConfigSource = None,
             text_encoder: str | None = None, trust: bool = False, device: torch.device = torch.device("cpu"),
             hash_checkpoint: bool = True, adapter: str | os.PathLike[str] | None = None,
             merge_lora: bool = False) -> LoadedModel:
        """`adapter`: a PEFT adapter folder or file applied on top of `checkpoint` (also found by itself: an
        adapter folder given as `checkpoint`, or LoRA keys in the checkpoint); `merge_lora` merges it."""
        from nanscope.stacks.formats import peft as ps
        from nanscope.stacks.formats.checkpoint import file_sha256, load_into, read_state_dict
        from nanscope.stacks.formats.shared_state import share_with_model

        ckpt = Path(checkpoint)
        adapter_path = Path(adapter) if adapter is not None else None
        if ckpt.is_dir() and (ckpt / ps.ADAPTER_CONFIG).is_file():  # an adapter folder given as CHECKPOINT
            if adapter_path is not None:
                raise ConfigError(f"{str(ckpt)!r} is an adapter folder and --adapter {adapter} was given too; pass "
                                  "the base checkpoint as CHECKPOINT")
            adapter_path, ckpt = ckpt, ps.base_checkpoint_of(ckpt, ps.read_adapter_config(ckpt / ps.ADAPTER_CONFIG))
        source = f"checkpoint {str(ckpt)!r}"
        with progress.stage("reading the checkpoint", "read the checkpoint"):
            state, notes = _groundingdino_names(read_state_dict(ckpt, trust=trust), source)
            split, adapter_cfg, adapter_cfg_file = _peft_split(state, ckpt, adapter_path, trust=trust)
        te = resolve_text_encoder(config, text_encoder)
        overrides, untie_notes = _untie_box_heads(split.base if split is not None else state, config)
        with progress.stage("building the model", "built the model"):
            model, cfg = build_model(config, text_encoder=te, overrides=overrides)
        with progress.stage("loading the weights", "loaded the weights"):
            if split is None:
                fit = load_into(model, state, source=source)
            else:
                model, fit = self._load_peft(model, split, adapter_cfg, adapter_cfg_file, source=source,
                                             adapter_path=adapter_path, merge=merge_lora)
                state = {k: v.detach() for k, v in model.state_dict().items()}  # under PEFT's names when unmerged
        if notes or untie_notes:
            fit = dataclasses.replace(fit, notes=tuple(notes) + tuple(untie_notes) + fit.notes)
        model.to(device).eval()
        inputs = {
            "checkpoint": str(ckpt),
            "checkpoint_sha256": file_sha256(ckpt) if hash_checkpoint else None,
            "config": str(config) if config is not None else "groundingdino SwinT-OGC (default)",
            "text_encoder": str(cfg.text_encoder_type),
            "stack": self.name,
            "checkpoint_dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in state.values()
                                         if isinstance(v, torch.Tensor) and v.is_floating_point()}),
        }
        state = share_with_model(model, state)  # the file's copy of every weight the model holds is freed
        if adapter_path is not None:
            inputs["adapter"] = str(adapter_path)
        if fit.adapter is not None:
            inputs["lora"] = "merged" if merge_lora else "unmerged (PEFT layers)"
        return LoadedModel(self, model, cfg, model.tokenizer, int(getattr(cfg, "max_text_len", 256)), state, fit,
                           inputs)

    @staticmethod
    def _load_peft(model: nn.Module, split: Any, adapter_cfg: Any, adapter_cfg_file: Any, *, source: str,
                   adapter_path: Path | None, merge: bool) -> tuple[nn.Module, Any]:
        """Base weights into `model`, then the adapter on top: `(model with the adapter, combined KeyFit)`."""
        from nanscope.stacks.formats import peft as ps
        from nanscope.stacks.formats.checkpoint import MIN_FIT, key_fit, load_into

        if adapter_path is None:
            probe = key_fit(model, split.base)
            if probe.fraction < MIN_FIT:
                raise ps.trainable_only_error(source, split, probe.fraction, len(model.state_dict()), adapter_cfg)
        ps.spread_over_ties(model, split)
        base_fit = load_into(model, split.base, source=source)
        where = f"adapter {str(adapter_path)!r}" if adapter_path is not None else source
        out, adapter_fit, info = ps.apply_adapter(
            model, split, adapter_cfg, source=where, merge=merge,
            config_file=str(adapter_cfg_file) if adapter_cfg_file is not None else None)
        return out, ps.combine_fits(base_fit, adapter_fit, info, (ps.applied_note(where, info, merge),))

    def load_tokenizer(self, *, config: ConfigSource = None,
                       text_encoder: str | None = None) -> tuple[Any, int]:
        from groundingdino.util.get_tokenlizer import get_tokenlizer

        from nanscope.stacks._hf_progress import quiet_progress_bars

        cfg = load_config(config)
        te = resolve_text_encoder(config, text_encoder) or str(cfg.text_encoder_type)
        if os.sep in te or te.startswith("."):
            te = str(Path(te).resolve())
        try:
            with contextlib.redirect_stdout(io.StringIO()), quiet_progress_bars():
                tok = get_tokenlizer(te)
        except OSError as exc:
            raise ConfigError(f"text encoder {te!r} could not be loaded ({str(exc).splitlines()[0]}); "
                              "pass --text-encoder with a local folder holding the tokenizer") from None
        return tok, int(getattr(cfg, "max_text_len", 256))

    def model_call(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
        images = batch.images.to(device)
        if batch.image_masks is not None:
            from groundingdino.util.misc import NestedTensor

            images = NestedTensor(images, batch.image_masks.to(device))
        return (images,), {"captions": list(batch.captions)}

    def check_batch(self, model: nn.Module, batch: Any) -> None:
        """Two-stage GroundingDINO picks its queries by top-k over the encoder's positions: images that give
        fewer positions than queries fail inside groundingdino (`selected index k out of range`)."""
        gd = self.find_model(model)
        backbone = gd.backbone[0] if len(gd.backbone) else None
        queries, levels = int(getattr(gd, "num_queries", 0)), int(getattr(gd, "num_feature_levels", 0))
        if not hasattr(backbone, "out_indices") or getattr(gd.transformer, "two_stage_type", "") != "standard":
            return  # a ResNet backbone or one-stage queries: no top-k to run out of
        h, w = (int(x) for x in batch.images.shape[-2:])
        have = swin_positions(h, w, tuple(backbone.out_indices), levels)
        if have < queries:
            side = next(s for s in range(8, 4096, 8) if swin_positions(s, s, tuple(backbone.out_indices), levels)
                        >= queries)
            raise BatchError(f"images are {h}x{w} pixels: this model's {levels} feature levels give {have} positions "
                             f"for its {queries} queries (two-stage top-k); it needs images of at least "
                             f"{side}x{side} pixels (resize or pad them as the training pipeline does)")

    def call_captions(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str] | None:
        from nanscope.stacks.groundingdino.capture import call_captions

        return call_captions(args, kwargs)

    def capture(self, model: nn.Module, *, detach: bool = True) -> ContextManager[Capture]:
        """Every replayed forward runs under this: image features a provider cached on the model
        (rf-groundingdino's `set_image_tensor`) are dropped first, so the forward computes its own batch's."""
        from nanscope.stacks.groundingdino.capture import capture_groundingdino
        from nanscope.stacks.groundingdino.image_cache import fresh_image_features

        gd = self.find_model(model)
        return _chained(fresh_image_features(gd), capture_groundingdino(gd, detach=detach))

    def dump_meta(self, model: nn.Module) -> dict[str, Any]:
        from nanscope.stacks.formats.peft import live_adapter_config

        gd = self.find_model(model)
        name = str(getattr(getattr(gd, "tokenizer", None), "name_or_path", "") or "")
        te = str(Path(name).resolve()) if name and Path(name).is_dir() else (name or None)
        meta = {"stack": self.name, "model_class": type(gd).__name__, "text_encoder": te,
                "max_text_len": int(getattr(gd, "max_text_len", 256)), "num_queries": int(getattr(gd, "num_queries", 0))}
        lora = live_adapter_config(model)  # a PEFT-wrapped model: the dump replays through the same adapter
        if lora is not None:
            meta["peft"] = lora
        return meta


@contextlib.contextmanager
def _chained(outer: ContextManager[Any], inner: ContextManager[Capture]) -> Iterator[Capture]:
    with outer, inner as cap:
        yield cap


def _peft_split(state: dict[str, torch.Tensor], ckpt: Path, adapter: Path | None, *, trust: bool) -> tuple[Any, Any, Any]:
    """(SplitState or None, adapter config or None, its path) for a checkpoint and an optional adapter."""
    from nanscope.stacks.formats import peft as ps

    if adapter is not None:
        a_state, cfg, cfg_file = ps.read_adapter(adapter, trust=trust)
        mts = tuple((cfg or {}).get("modules_to_save") or ())
        split = ps.split_state(a_state, modules_to_save=mts)
        base = ps.split_state(state).base if ps.is_peft_state(state) else state
        split.overrides = tuple(split.base)  # heads the trainer unfroze and saved with the adapter win
        split.base = {**base, **split.base}
        return split, cfg, cfg_file
    if not ps.is_peft_state(state):
        return None, None, None
    cfg_file = ps.adapter_config_near(ckpt)
    cfg = ps.read_adapter_config(cfg_file) if cfg_file is not None else None
    return ps.split_state(state, modules_to_save=tuple((cfg or {}).get("modules_to_save") or ())), cfg, cfg_file


def _groundingdino_names(state: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """MMDetection's key names -> groundingdino-py's (with a note); MM-GroundingDINO is refused, naming why."""
    from nanscope.errors import CheckpointError
    from nanscope.stacks.formats import mmdet_keys

    mm = mmdet_keys.mm_grounding_dino_keys(state)
    if mm:
        raise CheckpointError(
            f"{source} is an MM-GroundingDINO checkpoint: its contrastive heads have a learned bias per layer and "
            f"a logit scale ({', '.join(mm[:3])}{', ...' if len(mm) > 3 else ''}), which groundingdino-py's "
            "ContrastiveEmbed does not have, so replaying it here would change every logit. Leave out --stack "
            "(or pass --stack hf): the transformers stack maps its keys onto MMGroundingDinoForObjectDetection, "
            "no conversion step needed"
        )
    if not mmdet_keys.is_mmdet_state(state):
        return state, []
    out = mmdet_keys.to_groundingdino(state)
    note = (f"{len(state)} keys were converted from MMDetection's GroundingDINO names (the inverse of mmdet's "
            "groundingdino_to_mmdet.py, Swin patch-merging channels re-ordered)")
    return out, [note]


def _untie_box_heads(state: dict[str, torch.Tensor], config: str | os.PathLike[str] | None) -> tuple[dict[str, Any], list[str]]:
    """Build untied per-layer box heads when the checkpoint's differ and the config ties them (SwinT-OGC does)."""
    from nanscope.stacks.formats.mmdet_keys import box_heads_differ

    diff = box_heads_differ(state)
    if diff == 0 or not load_config(config).get("dec_pred_bbox_embed_share", True):
        return {}, []
    note = (f"the checkpoint's per-layer box heads bbox_embed.{{i}} differ (by up to {diff:.3g}) while the config "
            "ties them (dec_pred_bbox_embed_share=True), so the model was built with them untied, as they were trained")
    return {"dec_pred_bbox_embed_share": False}, [note]
