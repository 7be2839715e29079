"""nanscope under hostile inputs and faults (issue 13): nothing a dump names runs, the NaN step is never
lost, user code does not choose the exit code, and the library raises only NanscopeError for bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from nanscope.cli import main
from nanscope.errors import (
    BatchError,
    ConfigError,
    CriterionError,
    NanscopeError,
    OutputError,
)
from nanscope.stacks.groundingdino.demo import demo_batch
from nanscope.watch.report import NonFiniteStepError
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


# ------------------------------------------------------------ 4. the NaN step survives a dump that cannot be written


def _bad_run(model: torch.nn.Module, dumps: Path, *, before_bad_step=None) -> NonFiniteStepError:
    """Steps 0-1 healthy, step 2 NaN in loss_bbox; `before_bad_step()` runs just before the bad check."""
    import nanscope

    x = torch.ones(2, model.in_features)
    with pytest.raises(NonFiniteStepError) as info, nanscope.watch(model, dumps) as w:
        for step in range(4):
            out = model(x)
            terms = {"loss_ce": out.mean(), "loss_bbox": out.abs().mean() * (math.nan if step == 2 else 1.0)}
            if step == 2 and before_bad_step is not None:
                before_bad_step()
            w.check(step, terms)
    return info.value


def test_nonfinite_step_error_survives_a_dump_folder_under_a_file(tmp_path):
    dumps = tmp_path / "nan-dumps"
    err = _bad_run(torch.nn.Linear(8, 8), dumps, before_bad_step=lambda: dumps.write_text("a file now"))
    assert err.report.step == 2 and err.report.nonfinite_terms == ("loss_bbox",)
    assert err.report.dump is None and "could not be written" in str(err) and str(dumps) in err.report.dump_error
    assert dumps.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["nan-dumps"]  # no partial folder


_FSIZE_SCRIPT = """
import json, math, resource, sys
from pathlib import Path
import torch, nanscope
from nanscope.watch.report import NonFiniteStepError
dumps = Path(sys.argv[1])
model = torch.nn.Linear(512, 512)  # a 1 MB checkpoint, over the 64 KB limit below
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    with nanscope.watch(model, dumps) as w:
        for step in range(3):
            loss = model(torch.ones(1, 512)).mean()
            w.check(step, {"loss_giou": loss * (math.nan if step == 1 else 1.0), "loss_ce": loss})
except NonFiniteStepError as exc:
    print(json.dumps({"step": exc.report.step, "terms": list(exc.report.nonfinite_terms),
                      "dump_error": exc.report.dump_error, "message": str(exc)}))
"""


def test_nonfinite_step_error_survives_a_file_size_limit(tmp_path):
    import subprocess
    import sys

    dumps = tmp_path / "nan-dumps"
    proc = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(dumps)], capture_output=True, text=True,
                          check=False, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["step"] == 1 and got["terms"] == ["loss_giou"]
    assert got["dump_error"] and "could not be written" in got["message"]
    assert list(dumps.iterdir()) == []  # the half-written dump was removed, not left behind


def test_watch_refuses_a_dump_folder_it_cannot_write(tmp_path):
    import nanscope

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        nanscope.watch(torch.nn.Linear(2, 2), blocker / "nan-dumps")
    if Path("/proc/self").is_dir():  # Linux: a kernel file system that refuses new files, even from root
        with pytest.raises(OutputError, match="cannot be written"):
            nanscope.watch(torch.nn.Linear(2, 2), "/proc/nanscope-dumps")
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder only stops other users
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="cannot be written"):
            nanscope.watch(torch.nn.Linear(2, 2), ro)


# ------------------------------------------------------------ 6. user code does not choose nanscope's exit code

_EXITING = """
import sys


def exits(outputs, targets):
    sys.exit(0)  # "nothing to do here"


def interrupts(outputs, targets):
    raise KeyboardInterrupt
"""


@pytest.fixture(scope="module")
def small_batch(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("batch") / "batch.pt"
    torch.save(demo_batch(0, long=False), path)
    return path


@pytest.mark.parametrize("attr, code, says", [("exits", 2, ["your criterion", "exited", "SystemExit(0)", ":6 "]),
                                              ("interrupts", 130, ["interrupted"])])
def test_a_criterion_calling_sys_exit_is_an_error_not_exit_0(attr, code, says, tmp_path, demo_files, small_batch,
                                                             capsys):
    crit = tmp_path / "exiting.py"
    crit.write_text(_EXITING)
    out = tmp_path / "r.json"
    got = main(["inspect", str(demo_files.checkpoint), str(small_batch), "--config", str(demo_files.config),
                "--criterion", f"{crit}:{attr}", "--json", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert got == code
    assert all(s in err for s in says), err  # exits: names the user's own line (exiting.py:6)
    assert not out.exists()  # stopped before any result: no JSON, as for every exit 2 and 130


# ------------------------------------------------------------ 8. the library keeps its contract


def _saved(tmp_path: Path, name: str, mutate) -> str:
    raw = demo_batch(0, long=False)
    mutate(raw)
    path = tmp_path / f"{name}.pt"
    torch.save(raw, path)
    return str(path)


def _empty(raw: dict) -> None:
    raw.update(images=raw["images"][:0], captions=[], targets=[])


BAD_INPUTS = [
    ("below the minimum size", lambda r: r.update(images=torch.randn(2, 3, 64, 64)), None, BatchError,
     "at least 208x208"),
    ("no images", _empty, None, BatchError, "no images"),
    ("a string in a box", lambda r: r["targets"][0].__setitem__("boxes", [[0.5, 0.5, 0.1, "0.1"]]), None,
     BatchError, r"targets\[0\]\.boxes is \[\[0\.5, 0\.5, 0\.1, .0\.1.\]\]; expected a tensor or list of \[cx, cy, w, h\] numbers"),
    ("meta-device loss", lambda r: None, "meta", CriterionError, "meta device"),
]


@pytest.mark.parametrize("name, mutate, crit, error, match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_library_raises_nanscope_errors_for_bad_inputs(name, mutate, crit, error, match, tmp_path, demo_files):
    import nanscope

    criterion = None
    if crit == "meta":
        path = tmp_path / "meta_loss.py"
        path.write_text("import torch\n\ndef meta(outputs, targets):\n"
                        "    return {'loss_ce': torch.zeros((), device='meta')}\n")
        criterion = f"{path}:meta"
    with pytest.raises(error, match=match) as info:
        nanscope.inspect(str(demo_files.checkpoint), _saved(tmp_path, "b", mutate), config=str(demo_files.config),
                         text_encoder=str(demo_files.text_encoder), criterion=criterion)
    assert isinstance(info.value, NanscopeError)


def test_what_groundingdino_prints_is_kept_out_of_stdout_and_shown_in_the_report(tmp_path, demo_files, capfd):
    import nanscope
    from nanscope.report.terminal import render_plain

    batch = _saved(tmp_path, "nan", lambda r: r["images"].__setitem__((0, 1, 5, 5), float("nan")))
    result = nanscope.inspect(str(demo_files.checkpoint), batch, config=str(demo_files.config),
                              text_encoder=str(demo_files.text_encoder))
    assert capfd.readouterr().out == ""  # nothing reached stdout, not even at the file-descriptor level
    layers = int(json.loads(Path(demo_files.config).read_text())["dec_layers"])
    printed = result.model_stdout.splitlines()
    assert [p for p in printed if p.startswith("output layer_id")] == [f"output layer_id {i} is nan"
                                                                      for i in range(layers)]
    assert any(p.startswith("num_nan ") for p in printed)
    assert result.to_dict()["model_stdout"] == result.model_stdout
    text = render_plain(result).splitlines()
    start = text.index(next(x for x in text if x.startswith("--- printed by the model")))
    assert text[start + 1] == "output layer_id 0 is nan" and "output layer_id 0 is nan" not in text[:start]


def test_only_trust_config_lets_an_old_dump_name_a_py_config(tmp_path):
    from nanscope.stacks.formats.safe_config import ConfigValues, dump_config

    meta = {"config": str(tmp_path / "train.py")}
    with pytest.raises(ConfigError, match="never run"):
        dump_config(meta, "d", trust_py=False)
    assert dump_config(meta, "d", trust_py=True) == meta["config"]
    recorded = dump_config({**meta, "config_values": {"modelname": "groundingdino"}}, "d", trust_py=True)
    assert isinstance(recorded, ConfigValues) and dict(recorded.values) == {"modelname": "groundingdino"}


def test_a_py_configs_recorded_values_are_what_groundingdino_reads():
    from groundingdino.util.slconfig import SLConfig

    from nanscope.stacks.groundingdino.stack import default_config_path, load_config
    from nanscope.stacks.formats.safe_config import ConfigValues
    from nanscope.watch.sentinel import recorded_config

    path = default_config_path()  # groundingdino's own GroundingDINO_SwinT_OGC.py
    values = recorded_config(path)
    own = SLConfig.fromfile(str(path))._cfg_dict.to_dict()
    assert values == json.loads(json.dumps(own))  # the same values, as JSON (tuples become lists)
    cfg = load_config(ConfigValues(values))
    assert cfg.num_queries == own["num_queries"] and cfg.backbone == own["backbone"]


def test_the_model_printed_block_in_json_and_html_round_trips():
    from nanscope.report.html import render_html
    from nanscope.result import Result

    printed = "output layer_id 0 is nan\nnum_nan 12, num_inf 0 <&>\n"
    result = Result(kind="inspect", model_stdout=printed)
    again = Result.from_dict(json.loads(result.to_json()))
    assert again.model_stdout == printed and "model_stdout" not in Result(kind="inspect").to_dict()
    import jsonschema

    from nanscope.report.json_io import result_schema

    jsonschema.validate(result.to_dict(), result_schema(), cls=jsonschema.Draft202012Validator)
    page = render_html(result)
    assert "Printed by the model" in page and "num_nan 12, num_inf 0 &lt;&amp;&gt;" in page
