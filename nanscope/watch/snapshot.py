"""The dump of one training step: pre-step weights, the batch, RNG states and a manifest.

Layout of a dump folder (what `nanscope inspect DUMP` reads):

    checkpoint.pth   {"model": state_dict}, plain CPU tensors (loads with weights_only=True); a PEFT-wrapped
                     model's under PEFT's own names (X.base_layer.weight, X.lora_A.default.weight, ...)
    adapter_config.json  only for a PEFT-wrapped model: its LoRA config, so the replay runs the same adapter
    batch.pt         the batch in nanscope's schema (images, captions, targets), CPU tensors
    rng.pt           torch/CUDA/Python/NumPy generator states, plain tensors and ints
    manifest.json    step, rank, origin, loss terms ("nan"/"inf" as strings), scaler state, paths

`WeightSnapshot` keeps a device copy of the weights as they were before the first bad step without
reading anything back to the host: `update(keep)` is a `torch.where` over one flat buffer per dtype.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from nanscope.watch.dump_targets import dump_target

MANIFEST_FORMAT = "nanscope-watch-dump"
MANIFEST_VERSION = 1


def model_stack(model: nn.Module) -> Any:
    """The stack of `model` (nanscope.stacks), or None for a model no stack knows (any nn.Module can be watched)."""
    from nanscope.errors import ConfigError
    from nanscope.stacks import stack_for_model

    try:
        return stack_for_model(model)
    except ConfigError:
        return None


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose state dict a fresh model loads: the detector inside wrappers, else DDP's `module`."""
    stack = model_stack(model)
    if stack is not None:
        return stack.find_model(model)
    m: Any = model
    for _ in range(8):
        inner = getattr(m, "_orig_mod", None) or getattr(m, "module", None)
        if not isinstance(inner, nn.Module):
            break
        m = inner
    return m


def floats(x: float) -> float | str:
    """A float for JSON: NaN and infinities become the strings "nan", "inf", "-inf"."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


# ---------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """The generator states a replay needs, raw and cheap (~20 us); `portable_rng` makes them saveable."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device()
        state["cuda"] = torch.cuda.get_rng_state(dev)  # seed and offset: host-side, no sync
        state["cuda_device"] = dev
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is optional for the sentinel
        pass
    return state


def portable_rng(state: Mapping[str, Any]) -> dict[str, Any]:
    """`capture_rng()` output as tensors, ints and strings only (loads with weights_only=True)."""
    out: dict[str, Any] = {k: v for k, v in state.items() if k in ("torch", "cuda", "cuda_device")}
    version, internal, gauss = state["python"]
    out["python"] = {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                     "gauss": None if gauss is None else float(gauss)}
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        out["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype("int64")),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the generators from a `portable_rng()` dict (e.g. `torch.load(DUMP/rng.pt)["before_forward"]`)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], int(state.get("cuda_device", 0)))
    py = state.get("python")
    if py is not None:
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state.get("numpy")
    if npst is not None:
        import numpy as np

        np.random.set_state((npst["name"], npst["keys"].numpy().astype("uint32"), npst["pos"],
                             npst["has_gauss"], npst["cached_gaussian"]))


# ---------------------------------------------------------------- batch


def _images(x: Any, notes: list[str]) -> tuple[Tensor | None, Tensor | None]:
    """Model images -> ([B, 3, H, W] on CPU, [B, H, W] bool padding mask or None)."""
    if isinstance(x, Tensor):
        return x.detach().cpu(), None
    if hasattr(x, "tensors") and isinstance(x.tensors, Tensor):  # groundingdino's NestedTensor
        mask = getattr(x, "mask", None)
        return x.tensors.detach().cpu(), (mask.detach().cpu().bool() if isinstance(mask, Tensor) else None)
    if isinstance(x, Sequence) and x and all(isinstance(t, Tensor) for t in x):
        shapes = {tuple(t.shape) for t in x}
        if len(shapes) == 1:
            return torch.stack([t.detach().cpu() for t in x]), None
        h = max(int(t.shape[-2]) for t in x)
        w = max(int(t.shape[-1]) for t in x)
        out = torch.zeros(len(x), 3, h, w, dtype=x[0].dtype)
        mask = torch.ones(len(x), h, w, dtype=torch.bool)
        for i, t in enumerate(x):
            out[i, :, : t.shape[-2], : t.shape[-1]] = t.detach().cpu()
            mask[i, : t.shape[-2], : t.shape[-1]] = False
        notes.append(f"images: {len(x)} images of different sizes were zero-padded to {h}x{w} (bottom/right), "
                     "image_masks marks the padding")
        return out, mask
    return None, None


def schema_batch(batch: Mapping[str, Any] | Sequence[Any]) -> tuple[dict[str, Any], list[str]]:
    """Keep what fits nanscope's batch schema, on CPU. Returns `(batch, notes)`; notes name what was dropped.

    Also takes a DETR-style `(samples, targets)` pair; captions missing from the batch are read from
    the targets' "caption" (Open-GroundingDino) when there. Targets keep the trainer's own keys under
    `extra` and its positive map (see `nanscope.watch.dump_targets`).
    """
    from nanscope.replay.hf_batch import hf_batch_dict, is_hf_batch

    if is_hf_batch(batch):  # transformers' form (pixel_values, input_ids, ..., labels): kept as it is
        return hf_batch_dict(batch)  # type: ignore[arg-type]
    notes: list[str] = []
    out: dict[str, Any] = {}
    if not isinstance(batch, Mapping):
        if not (isinstance(batch, Sequence) and len(batch) == 2):
            return {}, [f"batch is a {type(batch).__name__}; expected a dict or an (images, targets) pair"]
        batch = {"images": batch[0], "targets": batch[1]}
    if "captions" not in batch and isinstance(batch.get("targets"), Sequence):
        caps = [t.get("caption") if isinstance(t, Mapping) else None for t in batch["targets"]]
        if caps and all(isinstance(c, str) for c in caps):
            batch = {**batch, "captions": caps}
    images, masks = _images(batch.get("images"), notes) if "images" in batch else (None, None)
    if images is not None:
        out["images"] = images
    if isinstance(batch.get("image_masks"), Tensor):
        masks = batch["image_masks"].detach().cpu().bool()
    if masks is not None:
        out["image_masks"] = masks
    captions = batch.get("captions")
    if isinstance(captions, Sequence) and not isinstance(captions, str):
        out["captions"] = [str(c) for c in captions]
    targets = batch.get("targets")
    if isinstance(targets, Sequence):
        kept = []
        for i, t in enumerate(targets):
            if not isinstance(t, Mapping):
                notes.append(f"targets[{i}]: a {type(t).__name__}, not a dict; dropped")
                continue
            kept.append(dump_target(t, i, notes))  # schema keys, the trainer's positive map and own keys
        out["targets"] = kept
    dropped = sorted(str(k) for k in batch if k not in ("images", "captions", "targets", "image_masks"))
    if dropped:
        notes.append(f"dropped batch keys: {', '.join(dropped)}")
    return out, notes


def save_schema_batch(path: Path, batch: Mapping[str, Any]) -> list[str]:
    """Write `batch` (already schema-shaped) with nanscope.replay.batch when it validates, else as is. Returns notes."""
    try:
        from nanscope.replay.batch import save_batch
        from nanscope.replay.hf_batch import is_hf_batch, validate_hf_batch
    except ImportError:
        torch.save(dict(batch), path)
        return []
    try:
        if is_hf_batch(batch):
            validate_hf_batch(batch, source="the batch")
            torch.save(dict(batch), path)
        else:
            save_batch(path, batch)
        return []
    except Exception as exc:  # the schema check failed: keep the data, say why
        torch.save(dict(batch), path)
        return [f"batch does not pass nanscope's schema check ({str(exc)[:200]}); saved as given"]


# ---------------------------------------------------------------- weights


def cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The live weights as plain, detached CPU tensors, under the names the model's stack loads again."""
    stack = model_stack(model)
    if stack is not None:
        return stack.dump_state_dict(model)
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()
            if isinstance(v, Tensor)}


@dataclass
class _Group:
    names: list[str]
    tensors: list[Tensor]
    flat: Tensor


class WeightSnapshot:
    """A device copy of the floating-point state of `unwrap(model)`, frozen once `keep` turns True.

    `update(keep)` costs one `cat` and one `where` per dtype (memory: one extra copy of the weights,
    plus one transient copy), and never synchronizes with the device.
    """

    def __init__(self, model: nn.Module) -> None:
        self._module = unwrap(model)
        groups: dict[tuple[torch.device, torch.dtype], _Group] = {}
        for name, t in self._module.state_dict(keep_vars=True).items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                continue
            key = (t.device, t.dtype)
            if key not in groups:
                groups[key] = _Group([], [], torch.empty(0))
            groups[key].names.append(name)
            groups[key].tensors.append(t)
        for (device, dtype), g in groups.items():
            g.flat = torch.empty(sum(t.numel() for t in g.tensors), dtype=dtype, device=device)
        self._groups = list(groups.values())
        self.filled = False

    @property
    def nbytes(self) -> int:
        return sum(g.flat.numel() * g.flat.element_size() for g in self._groups)

    @torch.no_grad()
    def update(self, keep: Tensor | None) -> None:
        """Copy the live weights in, except where `keep` (a 0-dim bool tensor) is True."""
        for g in self._groups:
            cur = torch.cat([t.detach().reshape(-1) for t in g.tensors])
            if keep is None or not self.filled:
                g.flat.copy_(cur)
            else:
                torch.where(keep.to(g.flat.device, non_blocking=True), g.flat, cur, out=g.flat)
        self.filled = True

    def state_dict(self) -> dict[str, Tensor]:
        """The snapshot as CPU tensors; integer buffers come from the live model."""
        out = {k: v.detach().to("cpu", copy=True) for k, v in self._module.state_dict().items()
               if isinstance(v, Tensor)}
        for g in self._groups:
            flat = g.flat.cpu()
            i = 0
            for name, t in zip(g.names, g.tensors):
                out[name] = flat[i: i + t.numel()].view(t.shape).clone()
                i += t.numel()
        return out

    def release(self) -> None:
        self._groups = []


# ---------------------------------------------------------------- the folder


def write_dump(folder: Path, *, state_dict: Mapping[str, Tensor] | None, batch: Mapping[str, Any] | None,
               rng: Mapping[str, Any], manifest: dict[str, Any]) -> Path:
    """Write a dump folder (created if needed) and return it; `manifest["files"]` lists what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str | None] = {"checkpoint": None, "batch": None, "rng": "rng.pt"}
    notes = list(manifest.get("notes", []))
    if state_dict is not None:
        torch.save({"model": dict(state_dict)}, folder / "checkpoint.pth")
        files["checkpoint"] = "checkpoint.pth"
        lora = (manifest.get("stack") or {}).get("peft")
        if isinstance(lora, dict):  # a PEFT-wrapped model: its LoRA config, read by the replay next to the weights
            (folder / "adapter_config.json").write_text(json.dumps(lora, indent=2, sort_keys=True) + "\n",
                                                       encoding="utf-8")
            files["adapter_config"] = "adapter_config.json"
    if batch is not None:
        notes += save_schema_batch(folder / "batch.pt", batch)
        files["batch"] = "batch.pt"
    torch.save(dict(rng), folder / "rng.pt")
    manifest = {**manifest, "files": files, "notes": notes}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read `DUMP/manifest.json` (given the folder or the file); raise InputError naming the file."""
    from nanscope.errors import InputError

    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise InputError(f"{str(p)!r} does not exist; expected a watch dump folder holding manifest.json")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{str(p)!r} is not readable JSON ({exc})") from None
    except RecursionError:  # nested thousands of levels deep: not a manifest nanscope wrote
        raise InputError(f"{str(p)!r} nests too deeply to be a watch dump manifest") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{str(p)!r} has format {data.get('format') if isinstance(data, dict) else None!r}; "
                         f"expected {MANIFEST_FORMAT!r}")
    data["_path"] = str(p.parent)
    return data
