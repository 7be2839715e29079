"""nanscope.watch.sharding without a process group: finding FSDP imports nothing, and key prefixes match
the names torch's own full state dict uses (the sharded runs are in tests/test_attach_fsdp.py)."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

from nanscope.watch.sharding import key_prefix, plain_class, sharding


def test_a_plain_model_is_not_sharded_and_fsdp_is_not_imported() -> None:
    code = ("import sys; from torch import nn; from nanscope.watch.sharding import sharding; "
            "print(sharding(nn.Sequential(nn.Linear(2, 2))), 'torch.distributed.fsdp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False"]  # (stack detection may import it: transformers does)


def test_key_prefix_names_a_module_as_torchs_state_dict_does() -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    inner = nn.Linear(3, 2)
    root = nn.ModuleDict({"head": nn.Sequential(nn.ReLU(), torch.compile(inner))})  # compile: `_orig_mod.`
    full = get_model_state_dict(root)  # torch's own names (one process: no FSDP, the same FQN rules)
    prefix = key_prefix(root, inner)
    assert prefix == "head.1."
    assert {k[len(prefix):] for k in full if k.startswith(prefix)} == set(inner.state_dict())
    assert key_prefix(root, root) == "" and key_prefix(root, nn.Linear(1, 1)) is None
    assert sharding(root) is None and plain_class(inner) is nn.Linear
