"""Issue 27, items 6-8 and 12: resource bombs are refused up front (exit 2, naming the file and the field)
within bounded memory, and pickled text-encoder weights are "cannot be read safely", never torch's advice.

Every bomb runs in one child process under `RLIMIT_AS` (ulimit -v) of a few GiB: without the checks
each one allocates far more (a 4 TB non-finite check, a 250 GB caption, 1e9-wide layers) or runs for
minutes, and the child dies or times out instead of printing its exit codes."""

from __future__ import annotations

import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanscope.stacks.groundingdino.demo import demo_batch

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
MEMORY_LIMIT = 6 << 30  # virtual memory of the child: torch's import takes ~1-2 GiB of address space
BILLION_LAUGHS = "".join(f"{c}: &{c} [{', '.join([f'*{p}' if p else repr('lol')] * 9)}]\n"
                         for p, c in zip([None, *"abcdefgh"], "abcdefghi"))

_RUNNER = """
import contextlib, io, json, sys
from nanscope.cli import main
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    out[name] = [code, err.getvalue()]
print(json.dumps(out))
"""


def _config(src: Path, dst: Path, **values) -> Path:
    cfg = json.loads(src.read_text())
    cfg.update(values)
    cfg["text_encoder_type"] = str(src.parent / cfg["text_encoder_type"])
    dst.write_text(json.dumps(cfg))
    return dst


def _fan_out(d: Path, demo_config: Path) -> Path:
    """Each level names the next level's file 12 times, the last is empty: 12**6 ~ 3e6 reads, no value repeated."""
    d.mkdir()
    (d / "level6.json").write_text("{}")
    for i in range(5, 0, -1):
        (d / f"level{i}.json").write_text(json.dumps({"_base_": [f"level{i + 1}.json"] * 12}))
    return _config(demo_config, d / "level0.json", _base_=["level1.json"] * 12)


def _batch(path: Path, mutate) -> Path:
    b = demo_batch(0, long=False)
    mutate(b)
    torch.save(b, path)
    return path


def _nested(b: dict) -> None:
    x: list = [0] * 20
    for _ in range(7):  # 20 ** 8 = 2.6e10 leaves by shared references, a few hundred bytes on disk
        x = [x] * 20
    b["targets"][0]["extra"] = {"nested": x}


def _expanded_map(b: dict) -> None:
    t = b["targets"][0]
    n = len(t["boxes"])
    t.pop("phrases", None)
    t.pop("tokens_positive", None)
    t["positive_map"] = torch.ones(1, 1).expand(n, 100_000_000)  # logical 1e8+ per row, one float stored


def _many_boxes(b: dict) -> None:
    n = 1_000_000
    b["targets"][0] = {"boxes": torch.full((n, 4), 0.5), "positive_map": torch.ones(n, 1)}


def _long_caption(b: dict) -> None:
    b["captions"][0] = "cat " * 250_000  # 1e6 characters


def _pickled_text_encoder(demo, d: Path) -> Path:
    te = d / "text_encoder"
    shutil.copytree(demo.folder / "text_encoder", te)
    from safetensors.torch import load_file

    weights = {k: v for k, v in load_file(str(te / "model.safetensors")).items()}
    for f in te.glob("model*.safetensors"):
        f.unlink()
    torch.save({**weights, "origin": pathlib.PosixPath("/tmp")}, te / "pytorch_model.bin")  # a pickled class
    return _config(demo.config, d / "config.json", text_encoder_type=str(te))


@pytest.mark.slow
def test_resource_bombs_are_refused_up_front_within_bounded_memory(tmp_path, demo_files):
    demo = demo_files
    ck = str(demo.checkpoint)
    small = _batch(tmp_path / "small.pt", lambda b: None)
    sd = torch.load(demo.checkpoint, weights_only=True)
    model = sd.get("model", sd)
    model["extra_key"] = torch.zeros(1, 1).expand(1_000_000, 1_000_000)  # 4 TB logical, 4 bytes stored
    torch.save({"model": model}, tmp_path / "expanded.pth")
    (tmp_path / "laughs.yaml").write_text(BILLION_LAUGHS)

    def inspect(checkpoint, batch, config, *extra):
        return ["inspect", str(checkpoint), str(batch), "--config", str(config), "--quiet", *extra]

    cases = {
        "hidden_dim": (inspect(ck, small, _config(demo.config, tmp_path / "h.json", hidden_dim=10**9)), ["hidden_dim"]),
        "num_queries": (inspect(ck, small, _config(demo.config, tmp_path / "q.json", num_queries=10**9)), ["num_queries"]),
        "max_text_len": (inspect(ck, small, _config(demo.config, tmp_path / "t.json", max_text_len=10**7)),
                         ["max_text_len"]),
        "yaml_alias_bomb": (inspect(ck, small, tmp_path / "laughs.yaml"), ["laughs.yaml", "alias"]),
        "base_fan_out": (inspect(ck, small, _fan_out(tmp_path / "fan", demo.config)), ["level0.json", "_base_"]),
        "many_boxes": (inspect(ck, _batch(tmp_path / "boxes.pt", _many_boxes), demo.config),
                       ["boxes.pt", "targets[0].boxes", "1000000"]),
        "long_caption": (inspect(ck, _batch(tmp_path / "caption.pt", _long_caption), demo.config),
                         ["caption.pt", "captions[0]", "1000000 characters"]),
        "expanded_positive_map": (inspect(ck, _batch(tmp_path / "pmap.pt", _expanded_map), demo.config),
                                  ["pmap.pt", "positive_map", "stride 0"]),
        "expanded_checkpoint_tensor": (inspect(tmp_path / "expanded.pth", small, demo.config),
                                       ["expanded.pth", "extra_key", "stride 0"]),
        "nested_extra": (inspect(ck, _batch(tmp_path / "nested.pt", _nested), demo.config),
                         ["nested.pt", "targets[0].extra", "shared references"]),
        "pickled_text_encoder": (inspect(ck, small, _pickled_text_encoder(demo, tmp_path / "te")),
                                 ["cannot be read safely", "pathlib"]),
    }
    lim = lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))  # noqa: E731
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps({k: v[0] for k, v in cases.items()})], env=ENV,
                          capture_output=True, text=True, timeout=240, preexec_fn=lim, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, says) in cases.items():
        code, err = got[name]
        assert code == 2, (name, err)
        assert all(s in err for s in says), (name, err)
        assert "weights_only=False" not in err and "\x1b[" not in err and "Traceback" not in err, (name, err)


def test_the_alias_and_fan_out_bounds_keep_real_configs(tmp_path, demo_files):
    """The bounds refuse bombs, not configs: a YAML with ordinary anchors and a two-level _base_ still load."""
    from nanscope.stacks.formats.safe_config import read_values

    (tmp_path / "a.yaml").write_text("base: &b {x: 1, y: [1, 2]}\nmodel: {<<: *b, z: 3}\nother: *b\n")
    assert read_values(tmp_path / "a.yaml", trust_py=False)["model"] == {"x": 1, "y": [1, 2], "z": 3}
    shutil.copy(demo_files.config, tmp_path / "base.json")
    (tmp_path / "child.json").write_text(json.dumps({"_base_": ["base.json"], "num_queries": 300}))
    values = read_values(tmp_path / "child.json", trust_py=False)
    assert values["num_queries"] == 300 and values["hidden_dim"] == json.loads(demo_files.config.read_text())["hidden_dim"]


def test_model_dimensions_are_checked_against_the_memory_given(demo_files):
    from nanscope.errors import ConfigError
    from nanscope.stacks.config_bounds import check_model_dims, model_bytes

    values = json.loads(demo_files.config.read_text())
    check_model_dims(values, "demo")  # the demo fits
    need = sum(model_bytes({**{"enc_layers": 6, "dec_layers": 6, "dim_feedforward": 2048, "num_queries": 900,
                                "max_text_len": 256}, **{k: values[k] for k in ("hidden_dim", "num_queries", "max_text_len",
                                                                               "enc_layers", "dec_layers",
                                                                               "dim_feedforward") if k in values}}).values())
    with pytest.raises(ConfigError, match="more than the"):
        check_model_dims(values, "demo", memory=need // 2)
