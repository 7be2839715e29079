"""The transformers stack: `GroundingDinoForObjectDetection` and `MMGroundingDinoForObjectDetection`.

Reads a `save_pretrained` folder (config.json + model.safetensors; its tokenizer when saved there,
else `--text-encoder`), a state-dict file with `--config` (a config.json or folder), or a
nanscope.watch dump (the config travels in the manifest as JSON values). Replays a batch the way a
transformers training loop calls the model (`pixel_values`, `input_ids`, `attention_mask`,
`token_type_ids`, `pixel_mask`) and captures what the loss sees (`nanscope.stacks.transformers.capture`).

A caption longer than `max_text_len` tokens makes transformers' detection head raise a shape error;
the replay cuts its ids to `max_text_len` (as the model's text backbone does) so the rest of the batch
can still be diagnosed, and NS110 reports the crash. Criteria: `--criterion transformers` is
transformers' own loss built from the model's config; for `--preset hf` verify-fix compares with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Iterator

import torch
from torch import nn

from nanscope.errors import CheckpointError, ConfigError
from nanscope.stacks.base import LoadedModel, Stack, find_wrapped
from nanscope.stacks.capture import Capture

DETECTOR_CLASSES = ("GroundingDinoForObjectDetection", "MMGroundingDinoForObjectDetection")
CRITERION_NAME = "transformers"  # --criterion / --before / --after transformers
REFERENCE = "nanscope.criterion.transformers_loss:TransformersReference"
_TOKENIZERS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()  # model -> its tokenizer


def is_detector(module: Any) -> bool:
    """A transformers (MM-)GroundingDino detection model, by class (no import of transformers needed)."""
    return any(c.__name__ in DETECTOR_CLASSES and c.__module__.startswith("transformers.")
               for c in type(module).__mro__)


def find_detector(model: nn.Module) -> nn.Module:
    """The detector inside DDP (`module`), PEFT (`base_model.model`) or torch.compile (`_orig_mod`)."""
    found = find_wrapped(model, is_detector)
    if found is None:
        raise ConfigError(f"no transformers GroundingDinoForObjectDetection inside {type(model).__name__}")
    return found


def _manifest_meta(checkpoint: Path) -> dict[str, Any]:
    """The stack meta of the watch dump holding `checkpoint` ({} when it is no dump)."""
    path = checkpoint.parent / "manifest.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8")).get("stack")
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def tokenizer_of(model: nn.Module) -> Any:
    det = find_detector(model)
    tok = _TOKENIZERS.get(det)
    if tok is None:
        raise ConfigError("no tokenizer is known for this transformers model; load it with nanscope (prepare / "
                          "the stack's load) or register one with nanscope.stacks.transformers.stack.set_tokenizer")
    return tok


def set_tokenizer(model: nn.Module, tokenizer: Any) -> None:
    """The tokenizer `model_call` encodes captions with (kept in a weak map, the model is not modified)."""
    _TOKENIZERS[find_detector(model)] = tokenizer


class TransformersHF(Stack):
    """Hugging Face transformers' GroundingDino and MM-GroundingDino."""

    name: ClassVar[str] = "transformers"
    default_preset: ClassVar[str] = "hf"
    truncates_captions: ClassVar[bool] = False  # GroundingDinoForObjectDetection raises on > max_text_len tokens

    def owns(self, model: nn.Module) -> bool:
        try:
            find_detector(model)
        except ConfigError:
            return False
        return True

    def find_model(self, model: nn.Module) -> nn.Module:
        return find_detector(model)

    def claims(self, checkpoint: Path) -> bool:
        p = Path(checkpoint)
        if p.is_dir():
            return (p / "config.json").is_file()
        if p.suffix == ".safetensors" and (p.parent / "config.json").is_file():
            try:
                return json.loads((p.parent / "config.json").read_text(encoding="utf-8")).get("model_type") in \
                    ("grounding-dino", "mm-grounding-dino")
            except (OSError, ValueError, AttributeError):
                return False
        if p.is_file() and _manifest_meta(p).get("stack") == self.name:
            return True
        from nanscope.stacks.transformers.mm_loading import is_mm_checkpoint

        return is_mm_checkpoint(p)  # an MMDetection MM-GroundingDINO / LLMDet .pth, mapped onto transformers' class

    def _config_data(self, checkpoint: Path, config: Any) -> dict[str, Any]:
        from nanscope.stacks.transformers.loading import check_model_type, config_dict

        if config is not None:
            return config_dict(config)
        if (checkpoint.parent / "config.json").is_file() and checkpoint.suffix == ".safetensors":
            return config_dict(checkpoint.parent)  # a save_pretrained folder's weights file, named directly
        meta = _manifest_meta(checkpoint)
        if isinstance(meta.get("hf_config"), dict):
            check_model_type(meta["hf_config"], f"{checkpoint.parent / 'manifest.json'} stack.hf_config")
            return dict(meta["hf_config"])
        raise ConfigError(f"checkpoint {str(checkpoint)!r} is a state-dict file: pass --config with the model's "
                          "config.json (or its save_pretrained folder)")

    def load(self, checkpoint: Any, *, config: Any = None, text_encoder: str | None = None, trust: bool = False,
             device: torch.device = torch.device("cpu"), hash_checkpoint: bool = True, adapter: Any = None,
             merge_lora: bool = False) -> LoadedModel:
        import transformers

        from nanscope.stacks.formats.checkpoint import file_sha256
        from nanscope.stacks.formats.shared_state import share_with_model
        from nanscope.stacks.transformers.loading import load_folder, load_state_file

        from nanscope.stacks.transformers.mm_loading import is_mm_checkpoint, load_mm_file

        path = Path(checkpoint)
        adapter_path = Path(adapter) if adapter is not None else None
        if adapter_path is None and path.is_dir() and (base := _adapter_base_folder(path)) is not None:
            adapter_path, path = path, base  # an adapter folder whose base_model_name_or_path is a local folder
        if path.is_dir():
            model, cfg, fit, weights = load_folder(path, config=config)
            loaded = set(fit.matched)
            state = {k: v for k, v in model.state_dict().items() if k in loaded}
        elif path.is_file() and (is_mm_checkpoint(path) or str(config or "").endswith(".py")):
            mm = load_mm_file(path, config=config, trust=trust)
            model, cfg, fit, weights = mm.model, mm.config, mm.fit, path
            state = {k: mm.state[k] for k in fit.matched}
            if text_encoder is None and mm.text_encoder is not None:
                text_encoder = mm.text_encoder  # the mmdet config's language_model.name
        elif path.is_file() and adapter_path is None and _peft_dump(path):  # a watched PeftModel's weights
            model, cfg, fit, state = _load_peft_state(path, self._config_data(path, config), trust=trust,
                                                      merge=merge_lora)
            weights, adapter_path = path, path
        elif path.is_file():
            model, cfg, fit, state = load_state_file(path, self._config_data(path, config), trust=trust)
            weights = path
        else:
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist; expected a save_pretrained folder")
        if adapter_path is not None and adapter_path != path:
            model, fit = _apply_peft(model, fit, adapter_path, trust=trust, merge=merge_lora)
            state = {k: v.detach() for k, v in model.state_dict().items()}  # under PEFT's names when unmerged
        tok, te = self._tokenizer(path, config, text_encoder)
        model.to(device).eval()
        set_tokenizer(model, tok)
        inputs = {"checkpoint": str(path), "checkpoint_sha256": file_sha256(weights) if hash_checkpoint and
                  weights.suffix != ".json" else None, "config": str(config) if config is not None else
                  ("config.json in the folder" if path.is_dir() else "the checkpoint (shapes and meta)"),
                  "text_encoder": te, "stack": self.name, "model_class": type(model).__name__,
                  "transformers": transformers.__version__,
                  # a state-dict file's own dtypes (read into the float32 model); a folder loads as transformers does
                  "checkpoint_dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in state.values()
                                               if isinstance(v, torch.Tensor) and v.is_floating_point()})
                  if path.is_file() else []}
        if adapter_path is not None:
            inputs["adapter"] = str(adapter_path)
            inputs["lora"] = "merged" if merge_lora else "unmerged (PEFT layers)"
        state = share_with_model(model, state)  # the file's copy of every weight the model holds is freed
        return LoadedModel(self, model, cfg, tok, int(cfg.max_text_len), state, fit, inputs)

    def _tokenizer(self, checkpoint: Path, config: Any, text_encoder: str | None) -> tuple[Any, str]:
        from nanscope.stacks.transformers.loading import has_tokenizer, load_tokenizer

        if text_encoder is not None:
            return load_tokenizer(text_encoder), str(text_encoder)
        config_folder = None
        if isinstance(config, (str, os.PathLike)):  # a config.json's folder holds the tokenizer save_pretrained wrote
            config_folder = Path(config) if Path(config).is_dir() else Path(config).parent
        own = checkpoint if checkpoint.is_dir() else checkpoint.parent  # save_pretrained put them beside the weights
        for folder in (own, config_folder):
            if folder is not None and has_tokenizer(folder):
                return load_tokenizer(folder), str(folder)
        raise ConfigError(f"{str(checkpoint)!r} holds no tokenizer (tokenizer.json or vocab.txt); pass --text-encoder "
                          "with the folder or name the processor was loaded from (e.g. IDEA-Research/grounding-dino-tiny)")

    def preset_for(self, model: nn.Module) -> str:
        """MM-GroundingDINO / LLMDet train with MMDetection's head: its loss is the reference ('mmdet')."""
        return "mmdet" if type(find_detector(model)).__name__.startswith("MM") else self.default_preset

    def load_tokenizer(self, *, config: Any = None, text_encoder: str | None = None) -> tuple[Any, int]:
        from nanscope.stacks.transformers.loading import config_dict, load_tokenizer

        if config is None and text_encoder is None:
            raise ConfigError("the transformers stack needs --config (a save_pretrained folder) or --text-encoder")
        max_len = int(config_dict(config).get("max_text_len", 256)) if config is not None else 256
        return load_tokenizer(text_encoder if text_encoder is not None else config), max_len

    def model_call(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
        det = find_detector(model)
        enc = tokenizer_of(det)(list(batch.captions), padding="longest", return_tensors="pt")
        limit = int(det.config.max_text_len)  # longer captions crash the head: cut as the text backbone does
        kwargs: dict[str, Any] = {"pixel_values": batch.images.to(device)}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in enc:
                kwargs[key] = enc[key][:, :limit].to(device)
        if batch.image_masks is not None:
            kwargs["pixel_mask"] = (~batch.image_masks).long().to(device)
        return (), kwargs

    def capture(self, model: nn.Module, *, detach: bool = True) -> ContextManager[Capture]:
        from nanscope.stacks.transformers.capture import capture_hf

        return capture_hf(self.find_model(model), detach=detach)

    def targets(self, batch: Any, texts: list[Any], device: torch.device) -> list[dict[str, Any]]:
        """The base targets, with transformers' meaning of `class_labels` (the index of the box's '.'-separated
        phrase, as its loss reads them; `labels` keeps nanscope's category index) and the caption's
        `phrase_map` [n_phrases, T] (transformers' `build_label_maps`), whose rows they index."""
        from nanscope.stacks.transformers.labels import class_labels, label_map

        out = super().targets(batch, texts, device)
        for t, target, info in zip(out, batch.targets, texts):
            lm = label_map(info)
            t["phrase_map"] = lm.to(device)
            t["class_labels"] = class_labels(target, info, lm).to(device)
        return out

    def reference_criterion(self, preset: str) -> str | None:
        return REFERENCE if preset == "hf" else None

    def criterion(self, name: str, model: nn.Module) -> tuple[Any, str] | None:
        if name != CRITERION_NAME:
            return None
        from nanscope.criterion.transformers_loss import TransformersLoss

        det = find_detector(model)
        return TransformersLoss(det.config), f"transformers {type(det).__name__} loss (its own config)"

    def finding_note(self, code: str, data: dict[str, Any]) -> str | None:
        import transformers

        v = f"transformers {transformers.__version__}"
        if code == "NS203":
            from nanscope.criterion.transformers_loss import nonfinite_cost_behaviour

            if nonfinite_cost_behaviour() == "raise":
                return f"{v}'s GroundingDinoHungarianMatcher raises scipy's ValueError on such costs."
            return (f"{v}'s GroundingDinoHungarianMatcher does not raise: it replaces NaN/inf costs by the largest "
                    "float, so such a box is matched to whichever query is left over - silently, with a "
                    "meaningless target.")
        if code == "NS201":
            kinds = data.get("kinds", {})
            notes = []
            if any(k in kinds for k in ("absolute pixels", "outside [0, 1]", "xyxy")):
                notes.append("takes pixel, out-of-range and xyxy boxes without an error (the loss stays finite, "
                             "just wrong)")
            if any(k in kinds for k in ("non-finite", "width or height <= 0")):
                notes.append("raises ValueError in generalized_box_iou ('boxes2 must be in [x0, y0, x1, y1] "
                             "(corner) format') on NaN boxes and negative sizes instead of returning a NaN loss")
            return f"{v}'s loss " + "; it ".join(notes) + "." if notes else None
        return None

    def dump_meta(self, model: nn.Module) -> dict[str, Any]:
        """The model's config as JSON values, its class, and where its tokenizer is: the folder or Hub name
        it was loaded from (`config._name_or_path`), else the tokenizer nanscope loaded for it."""
        from nanscope.stacks.transformers.loading import has_tokenizer

        det = find_detector(model)
        source = str(getattr(det.config, "_name_or_path", "") or "")
        if source and Path(source).is_dir():
            te = str(Path(source).resolve()) if has_tokenizer(Path(source)) else None
        else:
            te = source or None  # a Hub name: its processor's tokenizer, from the local cache
        tok = _TOKENIZERS.get(det)
        if te is None and tok is not None and Path(str(getattr(tok, "name_or_path", ""))).is_dir():
            te = str(Path(tok.name_or_path).resolve())
        from nanscope.stacks.formats.peft import live_adapter_config

        meta = {"stack": self.name, "model_class": type(det).__name__, "text_encoder": te,
                "max_text_len": int(det.config.max_text_len), "num_queries": int(det.config.num_queries),
                "hf_config": json.loads(det.config.to_json_string(use_diff=False))}
        lora = live_adapter_config(model)  # a PEFT-wrapped model: the dump replays through the same adapter
        if lora is not None:
            meta["peft"] = lora
        return meta


def _adapter_base_folder(folder: Path) -> Path | None:
    """The local save_pretrained folder a PEFT adapter folder names as its base_model_name_or_path, or None."""
    from nanscope.stacks.formats import peft as ps

    if not (folder / ps.ADAPTER_CONFIG).is_file():
        return None
    return ps.local_base(folder, ps.read_adapter_config(folder / ps.ADAPTER_CONFIG),
                         accept=lambda c: (c / "config.json").is_file())


def _apply_peft(model: nn.Module, fit: Any, adapter: Path, *, trust: bool, merge: bool) -> tuple[nn.Module, Any]:
    """A PEFT LoRA adapter (save_pretrained folder or file) on the loaded transformers model, through PEFT's own
    layers (merged on request); heads the trainer saved with it (modules_to_save) replace the base's."""
    from nanscope.stacks.formats import peft as ps
    from nanscope.stacks.formats.checkpoint import key_fit

    a_state, cfg, cfg_file = ps.read_adapter(adapter, trust=trust)
    split = ps.split_state(a_state, modules_to_save=tuple((cfg or {}).get("modules_to_save") or ()))
    if split.base:
        over = key_fit(model, split.base)
        model.load_state_dict({k: split.base[k] for k in over.matched}, strict=False)
        split.overrides = tuple(over.matched)
    return _apply_split(model, fit, split, cfg, cfg_file, f"adapter {str(adapter)!r}", merge)


def _peft_dump(path: Path) -> bool:
    """A state-dict file of a PEFT-wrapped model (a watch dump, or `torch.save(peft_model.state_dict())`) with
    its adapter_config.json beside it; not the adapter's own weights file."""
    from nanscope.stacks.formats import peft as ps

    return ps.adapter_config_near(path) is not None and path.name not in ps.ADAPTER_WEIGHTS


def _load_peft_state(path: Path, config_data: dict[str, Any], *, trust: bool,
                     merge: bool) -> tuple[nn.Module, Any, Any, dict[str, torch.Tensor]]:
    """A PeftModel's own state dict (base layers and LoRA weights under PEFT's names): the base weights into
    the model, then the adapter through PEFT's layers with the adapter_config.json beside the file."""
    from nanscope.stacks.formats import peft as ps
    from nanscope.stacks.formats.checkpoint import read_state_dict
    from nanscope.stacks.transformers.loading import _model_for_state

    cfg_file = ps.adapter_config_near(path)
    assert cfg_file is not None
    cfg = ps.read_adapter_config(cfg_file)
    split = ps.split_state(read_state_dict(path, trust=trust),
                           modules_to_save=tuple(cfg.get("modules_to_save") or ()))
    model, hf_cfg, fit, _ = _model_for_state(path, split.base, config_data, 0)
    model, fit = _apply_split(model, fit, split, cfg, cfg_file, f"checkpoint {str(path)!r}", merge)
    return model, hf_cfg, fit, {k: v.detach() for k, v in model.state_dict().items()}


def _apply_split(model: nn.Module, fit: Any, split: Any, cfg: Any, cfg_file: Any, where: str,
                 merge: bool) -> tuple[nn.Module, Any]:
    from nanscope.stacks.formats import peft as ps

    with input_embeddings_for_peft(model):
        out, adapter_fit, info = ps.apply_adapter(model, split, cfg, source=where, merge=merge,
                                                  config_file=str(cfg_file) if cfg_file is not None else None)
    return out, ps.combine_fits(fit, adapter_fit, info, (ps.applied_note(where, info, merge),))


@contextlib.contextmanager
def input_embeddings_for_peft(model: nn.Module) -> Iterator[None]:
    """PEFT (0.21) asks the model for `get_input_embeddings` to find weights tied to them, which transformers'
    GroundingDino does not answer (NotImplementedError): answer it with the text backbone's word embeddings
    (none of GroundingDino's ties involve them) while the adapter is applied, then remove the answer."""
    det = find_detector(model)
    try:
        det.get_input_embeddings()
    except NotImplementedError:
        pass
    else:  # the model answers it itself
        yield
        return
    det.get_input_embeddings = det.model.text_backbone.get_input_embeddings  # an instance attribute, deleted below
    try:
        yield
    finally:
        del det.get_input_embeddings
