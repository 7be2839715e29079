"""A new user's first hour (issue 26): the CLI's own words must be usable as they are printed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from nanscope.cli import build_parser, main


def test_version_flag_prints_the_installed_version():
    from importlib.metadata import version

    proc = subprocess.run([sys.executable, "-m", "nanscope", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"nanscope {version('nanscope')}"


def test_verify_fix_help_describes_every_check(capsys):
    from nanscope.verify import checks

    with pytest.raises(SystemExit):
        main(["verify-fix", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # the checks the module docstring numbers 1..10, each must be named in --help by its number
    numbered = [m.group(1) for line in checks.__doc__.splitlines() if (m := re.match(r"(\d+)\. ", line))]
    assert numbered == [str(i) for i in range(1, 11)]
    for i in range(1, 11):
        assert f"({i})" in text, f"check {i} is not described in verify-fix --help"


def _dollar_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("$ nanscope ")]


@pytest.mark.parametrize("stack", ["groundingdino-py"])
def test_demo_prints_commands_that_paste(tmp_path, capsys, stack):
    out = tmp_path / "a-rather-long-folder-name-so-that-the-paths-pass-eighty-columns" / "demo"
    code = main(["demo", "--out", str(out), "--no-html", "--no-verify", "--quiet", "--stack", stack])
    assert code in (0, 1)
    lines = _dollar_lines(capsys.readouterr().out)
    assert lines, "the demo printed no command"
    for line in lines:
        assert len(line) > 80  # the case that used to be wrapped
        argv = shlex.split(line[2:])[1:]
        args = build_parser().parse_args(argv)  # a wrapped line fails here: "expected one argument"
        assert args.checkpoint.startswith(str(out)) and args.batch.startswith(str(out))
        if args.command == "inspect":
            assert args.criterion == "nanscope.criterion:NaiveCriterion"
            assert args.config and args.config.startswith(str(out))


# ---------------------------------------------------------------- item 6: a transformers state-dict file


@pytest.fixture(scope="module")
def hf_state_file(tmp_path_factory):
    """The HF demo as a user who saved `model.state_dict()` has it: a .pth, and the save_pretrained folder
    (config.json + tokenizer) beside it."""
    import torch
    from safetensors.torch import load_file

    from nanscope.stacks.transformers.demo import write_hf_demo

    files = write_hf_demo(tmp_path_factory.mktemp("hf_state"))
    pth = files.folder / "weights.pth"
    torch.save(load_file(str(files.model / "model.safetensors")), pth)
    return files, pth


def test_a_transformers_state_dict_with_its_config_json_is_read_by_the_transformers_stack(hf_state_file, tmp_path,
                                                                                           capsys):
    import json

    files, pth = hf_state_file
    out = tmp_path / "r.json"
    code = main(["inspect", str(pth), str(files.batch), "--config", str(files.model / "config.json"), "--quiet",
                 "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err  # the demo batch is broken: a diagnosis, not a usage error
    assert json.loads(out.read_text())["inputs"]["stack"] == "transformers"


def test_a_transformers_config_for_the_groundingdino_stack_says_which_stack_reads_it(hf_state_file, capsys):
    files, pth = hf_state_file
    code = main(["inspect", str(pth), str(files.batch), "--config", str(files.model / "config.json"),
                 "--stack", "groundingdino-py", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "transformers config" in err and "--stack hf" in err, err
    assert "modelname" not in err


# ---------------------------------------------------------------- item 5: every argument before heavy work


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Reading the batch, building or loading a model and loading a tokenizer all raise: an argument error
    must come before any of them (then the CLI exits 2, not 3)."""
    import nanscope.replay.session as session
    import nanscope.scan.run as scan_run
    from nanscope.stacks.groundingdino.stack import GroundingDinoPy
    from nanscope.stacks.transformers.stack import TransformersHF

    def heavy(*a, **k):
        raise RuntimeError("heavy work began before the arguments were checked")

    monkeypatch.setattr(session, "read_batch", heavy)
    monkeypatch.setattr(GroundingDinoPy, "load", heavy)
    monkeypatch.setattr(TransformersHF, "load", heavy)
    monkeypatch.setattr(scan_run, "load_tokenizer", heavy)


ARG_CASES = [
    ("inspect criterion typo", lambda d, t: ["inspect", str(d.checkpoint), str(d.batch), "--config", str(d.config),
                                             "--criterion", "nanscope.criterion:NaiveCriteron"],
     "has no attribute 'NaiveCriteron'"),
    ("inspect criterion module typo", lambda d, t: ["inspect", str(d.checkpoint), str(d.batch), "--config",
                                                    str(d.config), "--criterion", "nanscope.criterio:NaiveCriterion"],
     "nanscope.criterio"),
    ("inspect bare criterion", lambda d, t: ["inspect", str(d.checkpoint), str(d.batch), "--criterion", "transformer"],
     "'transformer'"),
    ("verify-fix after typo", lambda d, t: ["verify-fix", str(d.checkpoint), str(d.batch), "--config", str(d.config),
                                            "--after", "nanscope.criterion:SetCriterio"],
     "has no attribute 'SetCriterio'"),
    ("verify-fix bare before", lambda d, t: ["verify-fix", str(d.checkpoint), str(d.batch), "--before", "transfomers"],
     "'transfomers'"),
    ("config missing", lambda d, t: ["inspect", str(d.checkpoint), str(d.batch), "--config", str(t / "nope.py")],
     "does not exist"),
    ("config not a config", lambda d, t: ["inspect", str(d.checkpoint), str(d.batch), "--config", str(t / "x.json")],
     "expected a groundingdino config"),
    ("config of another model", lambda d, t: ["inspect", str(d.checkpoint), str(d.batch), "--config",
                                              str(t / "bert.json")], "model_type 'bert'"),
    ("odvg od without label map", lambda d, t: ["scan", str(t / "od.jsonl"), "--text-encoder", str(d.text_encoder)],
     "--label-map"),
]


@pytest.mark.parametrize("name, argv, message", ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_argument_errors_come_before_any_heavy_work(demo_files, tmp_path, capsys, no_heavy_work, name, argv, message):
    import json
    from pathlib import Path

    (tmp_path / "x.json").write_text(json.dumps({"lr": 1e-4, "epochs": 12}))
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    od = Path(__file__).parents[1] / "fixtures" / "scan" / "od.jsonl"
    (tmp_path / "od.jsonl").write_bytes(od.read_bytes())
    code = main([*argv(demo_files, tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "heavy work began" not in err and message in err, err
