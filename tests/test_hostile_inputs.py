"""nanscope under hostile inputs and faults (issue 13): nothing a dump names runs, the NaN step is never
lost, user code does not choose the exit code, and the library raises only NanscopeError for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nanscope.cli import main
from nanscope.stacks.demo import demo_batch
from nanscope.watch.snapshot import MANIFEST_FORMAT, MANIFEST_VERSION

# ------------------------------------------------------------ 1. a dump's config never runs


def _demo_values(demo_files) -> dict:
    values = json.loads(Path(demo_files.config).read_text())
    values["text_encoder_type"] = str(Path(demo_files.text_encoder).resolve())
    return values


def _py_config(path: Path, values: dict, marker: Path) -> Path:
    """The demo config as a .py that also writes `marker` when it is executed."""
    lines = [f"{k} = {v!r}" for k, v in values.items()]
    lines.append(f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')")
    path.write_text("\n".join(lines) + "\n")
    return path


def _dump(folder: Path, demo_files, **manifest) -> Path:
    """A dump folder as someone might send it: the demo checkpoint and batch, and the given manifest fields."""
    folder.mkdir()
    shutil.copy(demo_files.checkpoint, folder / "checkpoint.pth")
    torch.save(demo_batch(0, long=False), folder / "batch.pt")
    meta = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": 3, "rank": 0, "world_size": 1,
            "text_encoder": str(Path(demo_files.text_encoder).resolve()), "stack": {"stack": "groundingdino-py"},
            "amp": {"autocast": {}}, **manifest}
    (folder / "manifest.json").write_text(json.dumps(meta))
    return folder


def _hostile_configs(d: Path, values: dict, marker: Path) -> dict[str, Path]:
    out = {"py": _py_config(d / "evil.py", values, marker)}
    out["yaml"] = d / "evil.yaml"
    out["yaml"].write_text(f"modelname: groundingdino\nx: !!python/object/apply:os.system ['touch {marker}']\n")
    out["json_base"] = d / "evil.json"
    out["json_base"].write_text(json.dumps({"_base_": "evil.py", "modelname": "groundingdino"}))
    return out


@pytest.mark.parametrize("kind", ["py", "yaml", "json_base"])
def test_inspect_dump_never_runs_the_config_it_names(kind, tmp_path, demo_files, capsys):
    marker = tmp_path / "pwned"
    configs = _hostile_configs(tmp_path, _demo_values(demo_files), marker)
    dump = _dump(tmp_path / "dump", demo_files, config=str(configs[kind]))
    code = main(["inspect", str(dump)])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert code == 2
    assert str(configs[kind]) in err or "evil.py" in err
    if kind == "py":
        assert f"--config {configs['py']}" in err  # the message tells the user how to run it themselves


def test_dump_replays_from_its_recorded_values_and_a_users_py_config_runs(tmp_path, demo_files, capsys):
    values = _demo_values(demo_files)
    marker = tmp_path / "ran"
    evil = _py_config(tmp_path / "evil.py", values, marker)
    dump = _dump(tmp_path / "dump", demo_files, config=str(evil), config_values=values)
    out = tmp_path / "r.json"
    assert main(["inspect", str(dump), "--json", str(out), "--quiet"]) in (0, 1)
    capsys.readouterr()
    assert not marker.exists()  # built from the values; the named .py never ran
    assert "config values recorded in" in json.loads(out.read_text())["inputs"]["config"]

    old = _dump(tmp_path / "old", demo_files, config=str(evil))  # an older dump: only a .py name
    assert main(["inspect", str(old), "--config", str(evil), "--quiet"]) in (0, 1)
    capsys.readouterr()
    assert marker.read_text() == "ran"  # the user named it: it ran
