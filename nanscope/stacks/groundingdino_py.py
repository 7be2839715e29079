"""Build the real groundingdino-py model from a config, and find it inside wrappers.

Configs are groundingdino's own (a `.py` as shipped, or `.json`/`.yaml` read by its `SLConfig`).
A config may carry `nanscope_swin = {embed_dim, depths, num_heads, window_size}`: the Swin backbone is
then built at that size (groundingdino only knows the five published sizes by name), which is how the
demo gets a ~4M-parameter model from the real modules.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from nanscope.errors import ConfigError

DEFAULT_CONFIG = "SwinT_OGC"  # groundingdino's GroundingDINO_SwinT_OGC.py, shipped inside the package
DEFAULT_TEXT_ENCODER = "bert-base-uncased"


def default_config_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("groundingdino")
    if spec is None or spec.origin is None:
        raise ConfigError("groundingdino-py is not installed; `pip install groundingdino-py==0.4.0`")
    return Path(spec.origin).parent / "config" / "GroundingDINO_SwinT_OGC.py"


def load_config(config: str | os.PathLike[str] | None) -> Any:
    """Read a groundingdino config with its own SLConfig; `None` means SwinT-OGC."""
    path = Path(config) if config is not None else default_config_path()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; expected a groundingdino config (.py or .json)")
    if path.suffix.lower() not in (".py", ".json", ".yml", ".yaml"):
        raise ConfigError(f"config file {str(path)!r} has suffix {path.suffix!r}; expected .py, .json or .yaml")
    from groundingdino.util.slconfig import SLConfig

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cfg = SLConfig.fromfile(str(path))
    except Exception as exc:  # groundingdino raises many kinds here
        raise ConfigError(f"config file {str(path)!r} could not be read: {exc}") from None
    if getattr(cfg, "modelname", None) != "groundingdino":
        raise ConfigError(
            f"config file {str(path)!r} has modelname={getattr(cfg, 'modelname', None)!r}; expected 'groundingdino'"
        )
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
    config: str | os.PathLike[str] | None = None,
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

    spec = cfg.get("nanscope_swin", None)
    try:
        with contextlib.redirect_stdout(io.StringIO()), _swin_size(dict(spec) if spec else None):
            model = gd_build(cfg)
    except OSError as exc:  # transformers cannot find the text encoder
        raise ConfigError(
            f"text encoder {cfg.text_encoder_type!r} could not be loaded ({str(exc).splitlines()[0]}); "
            "pass --text-encoder with a local folder holding the tokenizer and BERT weights"
        ) from None
    model.eval()
    return model, cfg


def find_groundingdino(model: nn.Module) -> nn.Module:
    """Return the GroundingDINO inside DDP (`module`), PEFT (`base_model.model`) or torch.compile (`_orig_mod`)."""
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

    seen: set[int] = set()
    m: Any = model
    while id(m) not in seen:
        seen.add(id(m))
        if isinstance(m, GroundingDINO):
            return m
        for attr in ("_orig_mod", "module", "base_model", "model"):
            inner = getattr(m, attr, None)
            if isinstance(inner, nn.Module):
                m = inner
                break
        else:
            break
    for sub in model.modules():
        if isinstance(sub, GroundingDINO):
            return sub
    raise ConfigError(f"no GroundingDINO module found inside {type(model).__name__}")
