"""The groundingdino-py stack: build the real model from a config, find it inside wrappers, load and replay it.

Configs are groundingdino's own (a `.py` as shipped, or `.json`/`.yaml`), read without running them
unless trusted (`nanscope.stacks.safe_config`), or the values a watch dump recorded (`ConfigValues`).
A config may carry `nanscope_swin = {embed_dim, depths, num_heads, window_size}`: the Swin backbone is
then built at that size (groundingdino only knows the five published sizes by name), which is how the
demo gets a ~4M-parameter model from the real modules.
"""

from __future__ import annotations

import contextlib
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
from nanscope.stacks.safe_config import BASE_KEY, ConfigValues, read_values

DEFAULT_CONFIG = "SwinT_OGC"  # groundingdino's GroundingDINO_SwinT_OGC.py, shipped inside the package
DEFAULT_TEXT_ENCODER = "bert-base-uncased"
ConfigSource = str | os.PathLike[str] | ConfigValues | None  # a file, a dump's values, or None (SwinT-OGC)


def default_config_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("groundingdino")
    if spec is None or spec.origin is None:
        raise ConfigError("groundingdino-py is not installed; `pip install groundingdino-py==0.4.0`")
    return Path(spec.origin).parent / "config" / "GroundingDINO_SwinT_OGC.py"


def load_config(config: ConfigSource, *, trust_py: bool = True) -> Any:
    """A groundingdino config as its `SLConfig`; `None` means SwinT-OGC, `ConfigValues` are a dump's values.

    JSON and YAML are read with safe loaders (`nanscope.stacks.safe_config`); a `.py` config (or a
    `.py` `_base_`) runs only when `trust_py`, the default for a file the caller names.
    """
    from groundingdino.util.slconfig import SLConfig

    if isinstance(config, ConfigValues):
        values, name = dict(config.values), str(config)
        if BASE_KEY in values:
            raise ConfigError(f"{name} name `_base_` files; recorded config values must be complete")
    else:
        path = Path(config) if config is not None else default_config_path()
        values, name = read_values(path, trust_py=trust_py or config is None), f"config file {str(path)!r}"
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
) -> tuple[nn.Module, Any]:
    """Build a GroundingDINO with random detector weights. Returns `(model, cfg)`; the model is in eval mode.

    `text_encoder` is a Hugging Face name or a local folder (tokenizer + BERT weights).
    """
    cfg = load_config(config)
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

    from nanscope.stacks import gdpy_bert_compat
    from nanscope.stacks._hf_progress import quiet_progress_bars

    gdpy_bert_compat.install()  # groundingdino's BERT wrapper on transformers 4.x and 5.x (see that module)
    spec = cfg.get("nanscope_swin", None)
    try:
        with contextlib.redirect_stdout(io.StringIO()), _swin_size(dict(spec) if spec else None), \
                quiet_progress_bars():
            model = gd_build(cfg)
    except OSError as exc:  # transformers cannot find the text encoder
        raise ConfigError(
            f"text encoder {cfg.text_encoder_type!r} could not be loaded ({str(exc).splitlines()[0]}); "
            "pass --text-encoder with a local folder holding the tokenizer and BERT weights"
        ) from None
    model.eval()
    return model, cfg


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
    cfg = load_config(config)
    te = str(getattr(cfg, "text_encoder_type", ""))
    candidate = Path(config).parent / te
    if te and not Path(te).is_absolute() and candidate.is_dir():
        return str(candidate)
    return None


class GroundingDinoPy(Stack):
    """IDEA-Research's groundingdino-py (and Open-GroundingDino, whose model code and keys are the same)."""

    name = "groundingdino-py"

    def owns(self, model: nn.Module) -> bool:
        try:
            self.find_model(model)
        except (ConfigError, ImportError):
            return False
        return True

    def find_model(self, model: nn.Module) -> nn.Module:
        return find_groundingdino(model)

    def claims(self, checkpoint: Path) -> bool:
        return Path(checkpoint).is_file()  # a torch file; the fallback stack for single files

    def load(self, checkpoint: str | os.PathLike[str], *, config: ConfigSource = None,
             text_encoder: str | None = None, trust: bool = False, device: torch.device = torch.device("cpu"),
             hash_checkpoint: bool = True) -> LoadedModel:
        from nanscope.stacks.checkpoint import file_sha256, load_into, read_state_dict

        with progress.stage("reading the checkpoint", "read the checkpoint"):
            state = read_state_dict(checkpoint, trust=trust)
        te = resolve_text_encoder(config, text_encoder)
        with progress.stage("building the model", "built the model"):
            model, cfg = build_model(config, text_encoder=te)
        with progress.stage("loading the weights", "loaded the weights"):
            fit = load_into(model, state, source=f"checkpoint {str(checkpoint)!r}")
        model.to(device).eval()
        inputs = {
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint) if hash_checkpoint else None,
            "config": str(config) if config is not None else "groundingdino SwinT-OGC (default)",
            "text_encoder": str(cfg.text_encoder_type),
            "stack": self.name,
            "checkpoint_dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in state.values()
                                         if isinstance(v, torch.Tensor) and v.is_floating_point()}),
        }
        return LoadedModel(self, model, cfg, model.tokenizer, int(getattr(cfg, "max_text_len", 256)), state, fit,
                           inputs)

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
        from nanscope.stacks.gdpy_capture import call_captions

        return call_captions(args, kwargs)

    def capture(self, model: nn.Module, *, detach: bool = True) -> ContextManager[Capture]:
        from nanscope.stacks.gdpy_capture import capture_groundingdino

        return capture_groundingdino(self.find_model(model), detach=detach)

    def dump_meta(self, model: nn.Module) -> dict[str, Any]:
        gd = self.find_model(model)
        name = str(getattr(getattr(gd, "tokenizer", None), "name_or_path", "") or "")
        te = str(Path(name).resolve()) if name and Path(name).is_dir() else (name or None)
        return {"stack": self.name, "model_class": type(gd).__name__, "text_encoder": te,
                "max_text_len": int(getattr(gd, "max_text_len", 256)), "num_queries": int(getattr(gd, "num_queries", 0))}
