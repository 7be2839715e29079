"""`nanscope inspect ADAPTER_DIR` alone: the folder PEFT's save_pretrained writes (as a trainer's
save_lora_adapters does) is recognised, and the message says what else is needed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nanscope.cli import main


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear1(x)


@pytest.fixture
def adapter_dir(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["linear1"]))
    folder = tmp_path / "lora_adapters"
    model.save_pretrained(str(folder))  # PEFT's own writer: adapter_config.json + adapter_model.safetensors
    return folder


def test_adapter_folder_alone_names_the_base_checkpoint_and_a_batch(adapter_dir, capsys) -> None:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    code = main(["inspect", str(adapter_dir)])
    err = " ".join(capsys.readouterr().err.split())  # the CLI may wrap its paragraph
    assert code == 2
    assert "is a PEFT adapter folder" in err and "inspect needs CHECKPOINT BATCH" not in err
    assert f"r={cfg['r']}, lora_alpha={cfg['lora_alpha']}" in err  # read from PEFT's own file
    assert "--adapter" in err and "BATCH" in err and "BASE_CHECKPOINT" in err
    assert repr(cfg.get("base_model_name_or_path")) in err  # the base it names (not a local file here)


def test_adapter_folder_whose_base_is_a_local_file_needs_only_a_batch(adapter_dir, tmp_path, capsys) -> None:
    base = tmp_path / "groundingdino_swint_ogc.pth"
    torch.save({"model": {}}, base)
    cfg_file = adapter_dir / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": str(base)}))
    assert main(["inspect", str(adapter_dir)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"nanscope inspect {adapter_dir} BATCH" in err and str(base) in err
