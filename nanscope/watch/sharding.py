"""Sharded models under FSDP: find them, and gather their full weights onto the rank that writes the dump.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`) and FSDP1 (`FullyShardedDataParallel`) each rank holds
only shards of the weights, so no rank's own `state_dict()` is a checkpoint `nanscope inspect DUMP/` can
load. At the bad step all ranks agreed on, every rank calls `full_weights` (a collective, like the
agreement itself): torch's `get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
cpu_offload=True))` gathers the unsharded weights, on the CPU, onto one rank (rank 0). The dump that
`merge_rank_dumps` names for the replay is the origin rank's, so when the origin is another rank the
tensors are sent to it, one tensor at a time (bytes, through the backend's device: a point-to-point send
each; peak extra memory on the device: one tensor). The other ranks' dumps hold no checkpoint and say
whose dump has it. The keys are the plain model's: torch drops `_fsdp_wrapped_module.`,
`_checkpoint_wrapped_module.`, `_orig_mod.` and DDP's `module.`.

Finding FSDP never imports it: a model can only be sharded once `torch.distributed.fsdp` was imported.
"""

from __future__ import annotations

import json
import sys
from typing import Literal

import torch
from torch import Tensor, nn

from nanscope.watch.ranks import RankContext, backend_device

Sharding = Literal["fsdp2", "fsdp1"]
WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")  # not in torch's keys


def sharding(model: nn.Module) -> Sharding | None:
    """"fsdp2" when `model` or a module inside it went through `fully_shard`, "fsdp1" for
    `FullyShardedDataParallel`, None for a model without sharded parts (FSDP is not imported for it)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return None
    fsdp2, fsdp1 = getattr(fsdp, "FSDPModule", None), getattr(fsdp, "FullyShardedDataParallel", None)
    for m in model.modules():
        if fsdp2 is not None and isinstance(m, fsdp2):
            return "fsdp2"
        if fsdp1 is not None and isinstance(m, fsdp1):
            return "fsdp1"
    return None


def plain_class(module: nn.Module) -> type:
    """The module's own class: `fully_shard` swaps it for a generated `FSDP<Name>(FSDPModule, <Name>)`."""
    cls = type(module)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    marker = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if marker is not None and marker in cls.__bases__:
        return next(b for b in cls.__bases__ if b is not marker)
    return cls


def key_prefix(root: nn.Module, target: nn.Module) -> str | None:
    """The prefix of `target`'s keys in torch's full state dict of `root` ('' for `root` itself): its path
    in `root` without FSDP's, activation checkpointing's, torch.compile's and DDP's wrapper names.
    None when `target` is not inside `root`."""
    ddp = nn.parallel.DistributedDataParallel
    for name, m in root.named_modules(remove_duplicate=False):
        if m is not target:
            continue
        kept, parent = [], root
        for part in name.split(".") if name else []:
            if part not in WRAPPER_NAMES and not (part == "module" and isinstance(parent, ddp)):
                kept.append(part)
            parent = getattr(parent, part)
        return "".join(f"{p}." for p in kept)
    return None


def full_weights(model: nn.Module, target: nn.Module, ctx: RankContext, writer: int) -> dict[str, Tensor] | None:
    """Collective, on every rank of `ctx`: the unsharded weights of `target` (a module inside `model`, or
    `model`), as plain CPU tensors under `target`'s own key names, returned on rank `writer` (None on the
    others). Raises what torch raises when it cannot gather them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = key_prefix(model, target) or ""
    mine = {k[len(prefix):]: v.detach() for k, v in full.items() if k.startswith(prefix) and isinstance(v, Tensor)}
    del full
    if not ctx.distributed:
        return mine
    holder = _holder(ctx, bool(mine))  # rank 0 with cpu_offload; asked, not assumed (FSDP1 uses its own group)
    if holder == writer:
        return mine if ctx.rank == writer else None
    if ctx.rank == holder:
        _send(mine, ctx, writer)
        return None
    if ctx.rank == writer:
        return _receive(ctx, holder)
    return None


def _holder(ctx: RankContext, has: bool) -> int:
    """The first rank that received the full state dict (0 when none did: an empty model)."""
    import torch.distributed as dist

    device = backend_device(ctx)
    mine = torch.tensor([1 if has else 0], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(out, mine, group=ctx.group)
    flags = torch.cat(out).tolist()
    return flags.index(1) if 1 in flags else 0


def _send(state: dict[str, Tensor], ctx: RankContext, dst: int) -> None:
    import torch.distributed as dist

    device = backend_device(ctx)
    meta = json.dumps([[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in state.items()])
    data = torch.frombuffer(bytearray(meta.encode("utf-8")), dtype=torch.uint8)  # JSON, never a pickle
    dist.send(torch.tensor([data.numel()], dtype=torch.int64, device=device), group=ctx.group, group_dst=dst)
    dist.send(data.to(device), group=ctx.group, group_dst=dst)
    for v in state.values():
        if v.numel():
            dist.send(_as_bytes(v).to(device), group=ctx.group, group_dst=dst)


def _receive(ctx: RankContext, src: int) -> dict[str, Tensor]:
    import torch.distributed as dist

    device = backend_device(ctx)
    size = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(size, group=ctx.group, group_src=src)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.recv(data, group=ctx.group, group_src=src)
    out: dict[str, Tensor] = {}
    for key, dtype_name, shape in json.loads(bytes(data.cpu().tolist()).decode("utf-8")):
        dtype = getattr(torch, dtype_name)
        n = int(torch.Size(shape).numel())
        if n == 0:
            out[key] = torch.empty(shape, dtype=dtype)
            continue
        buf = torch.empty(n * torch.empty((), dtype=dtype).element_size(), dtype=torch.uint8, device=device)
        dist.recv(buf, group=ctx.group, group_src=src)
        out[key] = buf.cpu().view(dtype).reshape(shape)
    return out


def _as_bytes(t: Tensor) -> Tensor:
    """A tensor's data as a flat uint8 tensor (gloo sends no bool tensors; bytes fit every dtype). [nbytes]"""
    return t.contiguous().reshape(-1).view(torch.uint8)
