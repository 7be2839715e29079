"""Which distribution provides `groundingdino` (nanscope/stacks/groundingdino/provider.py), and what follows.

Runs in every CI environment (.ci/run): groundingdino-py, rf-groundingdino 0.3.0, and the core install with no
`groundingdino` module at all. Layouts that no environment has for real (two distributions mixed in one folder,
a source folder, an editable install) are written into a temporary site folder the way pip leaves them
(package files plus `*.dist-info` with METADATA and a RECORD of sha256 hashes) and read in a fresh process.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_PROVIDER = importlib.util.find_spec("groundingdino") is not None


def _owner_by_metadata() -> str | None:
    """The distribution owning the imported `groundingdino/__init__.py`, from the full
    `packages_distributions()` scan (the slow path nanscope's provider avoids), names as pip spells them."""
    spec = importlib.util.find_spec("groundingdino")
    if spec is None:
        return None
    init = Path(spec.origin).resolve()
    for name in md.packages_distributions().get("groundingdino", []):
        dist = md.distribution(name)
        if any(Path(dist.locate_file(f)).resolve() == init for f in dist.files or ()):
            return dist.metadata["Name"].replace("_", "-").lower()
    return None


def _run(args: list[str], *, pythonpath: list[Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*(str(p) for p in pythonpath), str(ROOT)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _provider_in(pythonpath: list[Path], cwd: Path) -> dict:
    code = ("import json; from nanscope.stacks.groundingdino.provider import find_provider, environment_fields; "
            "p = find_provider(); print(json.dumps(None if p is None else {'label': p.label, 'distribution': "
            "p.distribution, 'version': p.version, 'mixed': p.mixed, 'env': environment_fields()}))")
    out = _run(["-c", code], pythonpath=pythonpath, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _sha(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _dist_info(site: Path, name: str, version: str, files: dict[str, bytes], *, extra: dict[str, str] | None = None) -> None:
    """A `*.dist-info` as pip writes it, whose RECORD holds `files` (path -> the bytes this distribution installed)."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text("groundingdino\n")
    for fname, text in (extra or {}).items():
        (info / fname).write_text(text)
    rows = [f"{p},{_sha(b)},{len(b)}" for p, b in files.items()]
    rows += [f"{info.name}/{f},," for f in ("METADATA", "top_level.txt", "RECORD", *(extra or {}))]
    (info / "RECORD").write_text("\n".join(rows) + "\n")


def _write(site: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)


GDPY = {"groundingdino/__init__.py": b"__version__ = '0.4.0'\n",
        "groundingdino/version.py": b"__version__ = '0.4.0'\n",
        "groundingdino/models/__init__.py": b"from .GroundingDINO import build_groundingdino\n"}
RF = {"groundingdino/__init__.py": b"__version__ = '0.4.0'\n\n",
      "groundingdino/models/__init__.py": b"from .GroundingDINO import build_groundingdino  # rf\n"}


@pytest.fixture()
def mixed_site(tmp_path: Path) -> Path:
    """groundingdino-py 0.4.0 installed, then rf-groundingdino 0.3.0 over it, interrupted half way: rf's
    `__init__.py` is on disk, groundingdino-py's `models/__init__.py` and `version.py` are left."""
    site = tmp_path / "site"
    _dist_info(site, "groundingdino-py", "0.4.0", GDPY)
    _dist_info(site, "rf_groundingdino", "0.3.0", RF)
    _write(site, GDPY)
    _write(site, {"groundingdino/__init__.py": RF["groundingdino/__init__.py"]})
    return site


def test_two_distributions_in_one_folder_are_reported_as_a_mix(mixed_site: Path, tmp_path: Path) -> None:
    got = _provider_in([mixed_site], tmp_path)
    assert got["mixed"] is True and got["distribution"] is None
    assert got["label"] == "mixed: groundingdino-py 0.4.0 + rf-groundingdino 0.3.0"
    assert got["env"] == {"groundingdino": "0.4.0", "groundingdino_provider": got["label"]}  # version.py on disk


def test_inspect_on_a_mixed_install_is_one_paragraph_naming_both(mixed_site: Path, tmp_path: Path) -> None:
    import torch

    from nanscope.stacks.groundingdino.demo import demo_batch

    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "checkpoint.pth")
    torch.save(demo_batch(0, long=False, image_size=64), tmp_path / "batch.pt")
    out = _run(["-m", "nanscope", "inspect", "checkpoint.pth", "batch.pt"], pythonpath=[mixed_site],
               cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    message = [line for line in out.stderr.splitlines() if line.startswith("nanscope: error:")]
    assert len(message) == 1 and "Traceback" not in out.stderr and "ImportError" not in out.stderr
    # file counts from the layout above: groundingdino-py's models/__init__.py and version.py are still its
    # own (2 of 3), rf-groundingdino's __init__.py is (1 of 2)
    for expected in ("groundingdino-py 0.4.0", "rf-groundingdino 0.3.0", str(mixed_site / "groundingdino"),
                     "2 of the 3 files groundingdino-py 0.4.0", "1 of the 2 files rf-groundingdino 0.3.0",
                     "pip uninstall -y groundingdino-py rf-groundingdino"):
        assert expected in message[0]


def test_a_source_folder_no_distribution_owns(tmp_path: Path) -> None:
    src = tmp_path / "GroundingDINO"
    _write(src, {"groundingdino/__init__.py": b"", "groundingdino/version.py": b"__version__ = '0.1.0'\n"})
    got = _provider_in([src], tmp_path)
    assert got["distribution"] is None and got["version"] == "0.1.0" and not got["mixed"]
    assert got["label"] == f"source folder {src / 'groundingdino'} (version.py: 0.1.0)"


def test_an_editable_install_of_idea_researchs_repository(tmp_path: Path) -> None:
    """`pip install -e .` in a clone: the dist-info (distribution `groundingdino`, setup.py's name) sits in
    site-packages with a PEP 610 direct_url.json; the module is imported from the clone."""
    src, site = tmp_path / "GroundingDINO", tmp_path / "site"
    _write(src, {"groundingdino/__init__.py": b"", "groundingdino/version.py": b"__version__ = '0.1.0'\n"})
    direct = json.dumps({"url": src.as_uri(), "dir_info": {"editable": True}})
    _dist_info(site, "groundingdino", "0.1.0", {}, extra={"direct_url.json": direct})
    got = _provider_in([src, site], tmp_path)
    assert (got["distribution"], got["version"]) == ("groundingdino", "0.1.0")
    assert got["label"] == f"groundingdino 0.1.0 (editable, {src})"


@pytest.mark.skipif(not HAS_PROVIDER, reason="needs a groundingdino provider (the core environment has none)")
def test_the_installed_provider_is_the_distribution_that_owns_the_module() -> None:
    from nanscope.result import environment
    from nanscope.stacks.groundingdino.provider import require

    owner = _owner_by_metadata()
    assert owner is not None
    provider = require()
    assert provider.distribution == owner and provider.version == md.version(owner)
    env = environment()
    assert env["groundingdino"] == md.version(owner) and env["groundingdino_provider"] == f"{owner} {md.version(owner)}"


def test_the_reports_name_the_provider() -> None:
    """JSON and HTML read the same environment: the provider's row in both (null in the core install)."""
    import html

    from nanscope.report.html import render_html
    from nanscope.result import Result, environment

    owner = _owner_by_metadata()
    label = None if owner is None else f"{owner} {md.version(owner)}"
    result = Result(kind="inspect", environment=environment())
    assert json.loads(json.dumps(result.to_dict()))["environment"]["groundingdino_provider"] == label
    page = render_html(result)
    assert "<th>groundingdino_provider</th>" in page
    if label is not None:
        assert html.escape(label) in page


@pytest.mark.skipif(HAS_PROVIDER, reason="the core environment (no groundingdino module): .ci/run's `core` run")
class TestCoreInstall:
    def test_the_groundingdino_stack_says_how_to_install_a_provider(self, tmp_path: Path) -> None:
        import torch

        from nanscope.errors import ConfigError
        from nanscope.stacks import get_stack
        from nanscope.stacks.groundingdino.demo import demo_batch
        from nanscope.stacks.groundingdino.provider import NoProviderError

        with pytest.raises(NoProviderError) as caught:
            get_stack("gdpy")
        assert isinstance(caught.value, ConfigError) and isinstance(caught.value, ImportError)
        torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "checkpoint.pth")
        torch.save(demo_batch(0, long=False, image_size=64), tmp_path / "batch.pt")
        for argv in (["inspect", "checkpoint.pth", "batch.pt"], ["demo", "--stack", "groundingdino-py", "--out", "d"]):
            out = _run(["-m", "nanscope", *argv], pythonpath=[], cwd=tmp_path)
            assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
            message = [line for line in out.stderr.splitlines() if line.startswith("nanscope: error:")]
            assert len(message) == 1 and "pip install 'nanscope[groundingdino]'" in message[0]
            assert "rf-groundingdino" in message[0] and "--stack hf" in message[0]

    def test_demo_runs_the_transformers_demo_and_says_so(self, tmp_path: Path) -> None:
        out = _run(["-m", "nanscope", "demo", "--out", "d", "--no-verify", "--no-html"], pythonpath=[], cwd=tmp_path)
        assert out.returncode == 0, out.stderr  # --no-verify: the demo's exit code is verify-fix's
        assert "no `groundingdino` module is installed" in out.stdout and "--stack hf" in out.stdout
        assert (tmp_path / "d" / "model" / "config.json").is_file()  # transformers' save_pretrained folder
        assert json.loads((tmp_path / "d" / "model" / "config.json").read_text())["model_type"] == "grounding-dino"


@pytest.mark.skipif(not HAS_PROVIDER or not os.environ.get("NANSCOPE_CROSS_VERSION_DIR"),
                    reason="only in .ci/run, which runs groundingdino-py first and rf-groundingdino after it")
def test_every_provider_gives_groundingdino_pys_outputs_on_the_demo_weights(demo_files) -> None:
    """The model code is the same: the demo's logits, boxes and every gradient, bitwise (one thread)."""
    import torch
    import transformers

    from nanscope.stacks.groundingdino.provider import require

    spec = importlib.util.spec_from_file_location("make_bert_reference", ROOT / "fixtures/bert_compat/make_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    step = ref.run_step(demo_files)
    folder = Path(os.environ["NANSCOPE_CROSS_VERSION_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    name = require().distribution
    torch.save(step, folder / f"provider-{name}-transformers-{transformers.__version__}.pt")
    if name == "groundingdino-py":
        return  # the writer; the other providers compare
    theirs = folder / f"provider-groundingdino-py-transformers-{transformers.__version__}.pt"
    assert theirs.is_file(), f"no groundingdino-py outputs in {folder}: .ci/run runs the groundingdino-py suite first"
    expected = torch.load(theirs, weights_only=True)
    assert sorted(step) == sorted(expected)
    differ = [k for k in expected if not torch.equal(step[k].isnan(), expected[k].isnan())
              or not torch.equal(step[k].nan_to_num(), expected[k].nan_to_num())]
    assert not differ, f"{name}: {len(differ)} of {len(expected)} tensors differ from groundingdino-py's: {differ[:5]}"
