"""The documentation never lies: every runnable block runs, the site builds strictly, generated pages agree.

- Blocks marked `<!-- run -->` / `<!-- run exit=N -->` in docs/**/*.md and README.md run page by page, in
  order, in one temporary folder per page holding `reports/demo/` (the demo files), `hf-demo/` (the
  transformers demo) and the repository's `fixtures/` (docs/extending.md describes the convention).
- `mkdocs build --strict` succeeds, and the built codes and API pages hold every code and every export.
- `nanscope codes` and the generated codes table list the same codes, severities and titles.
- Each `<!-- synopsis: COMMAND -->` block lists exactly the flags `nanscope COMMAND --help` has.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
RUN_MARKER = re.compile(r"^<!--\s*run(?:\s+exit=(\d+))?\s*-->$")
SYNOPSIS_MARKER = re.compile(r"^<!--\s*synopsis:\s*([a-z-]+)\s*-->$")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: re.Match[str]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def marked_blocks(path: Path, marker: re.Pattern[str]) -> list[Block]:
    """Fenced blocks whose opening fence directly follows a line matching `marker`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines[:-1]):
        m = marker.match(line.strip())
        if not m:
            continue
        fence = lines[i + 1]
        assert fence.startswith("```"), f"{path}:{i + 1}: a marker must stand on the line before a ``` fence"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(path, i + 2, fence[3:].strip().split(" ")[0], "\n".join(lines[i + 2:end]) + "\n", m))
    return blocks


def runnable_pages() -> list[Path]:
    return [p for p in DOC_FILES if marked_blocks(p, RUN_MARKER)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", NO_COLOR="1",
               COLUMNS="500", NO_MKDOCS_2_WARNING="1")
    return env


def console_commands(block: Block) -> list[tuple[list[str], list[str]]]:
    """(argv after `nanscope`, expected output lines) per `$ nanscope ...` command of a console block."""
    commands: list[tuple[list[str], list[str]]] = []
    pending = ""
    for line in block.text.splitlines():
        if pending or line.startswith("$ "):
            pending += (line[2:] if not pending else " " + line.strip())
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip()
                continue
            argv = shlex.split(pending)
            pending = ""
            assert argv[0] == "nanscope", f"{block.where}: runnable console blocks run `nanscope` commands only"
            commands.append((argv[1:], []))
        elif line.strip():
            assert commands, f"{block.where}: output before the first `$ ` command"
            commands[-1][1].append(line.rstrip())
    assert commands, f"{block.where}: a runnable console block needs a `$ nanscope ...` line"
    return commands


def expect_lines(where: str, expected: list[str], stdout: str) -> None:
    actual = [line.rstrip() for line in stdout.splitlines()]
    for want in expected:
        if "..." in want:
            prefix = want.split("...")[0].rstrip()
            ok = any(line.startswith(prefix) for line in actual)
        else:
            ok = want in actual
        assert ok, f"{where}: the documented line\n  {want}\nis not in the output:\n{stdout}"


@pytest.fixture(scope="module")
def hf_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nanscope.stacks.transformers.demo import write_hf_demo

    return write_hf_demo(tmp_path_factory.mktemp("docs-hf") / "hf-demo").folder


def page_folder(tmp: Path, demo_files, request: pytest.FixtureRequest, text: str) -> Path:
    (tmp / "reports").mkdir()
    (tmp / "reports" / "demo").symlink_to(demo_files.folder, target_is_directory=True)
    (tmp / "fixtures").symlink_to(ROOT / "fixtures", target_is_directory=True)
    if "hf-demo" in text:
        (tmp / "hf-demo").symlink_to(request.getfixturevalue("hf_demo"), target_is_directory=True)
    return tmp


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_blocks_run(page: Path, tmp_path: Path, demo_files, request: pytest.FixtureRequest) -> None:
    blocks = marked_blocks(page, RUN_MARKER)
    cwd = page_folder(tmp_path, demo_files, request, page.read_text(encoding="utf-8"))
    for n, block in enumerate(blocks):
        want = int(block.marker.group(1) or 0)
        if block.lang == "python":
            script = cwd / f"block{n}.py"
            script.write_text(block.text, encoding="utf-8")
            proc = subprocess.run([sys.executable, script.name], cwd=cwd, env=_env(), capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == want, f"{block.where}: exit {proc.returncode}, expected {want}\n{proc.stderr}"
        elif block.lang == "console":
            commands = console_commands(block)
            for k, (argv, expected) in enumerate(commands):
                proc = subprocess.run([sys.executable, "-m", "nanscope", *argv], cwd=cwd, env=_env(),
                                      capture_output=True, text=True, timeout=600)
                code = want if k == len(commands) - 1 or want else 0
                assert proc.returncode == code, (f"{block.where}: `nanscope {shlex.join(argv)}` exited "
                                                 f"{proc.returncode}, expected {code}\n{proc.stdout}\n{proc.stderr}")
                expect_lines(block.where, expected, proc.stdout)
        else:
            pytest.fail(f"{block.where}: runnable blocks are ```python or ```console, not {block.lang!r}")


def test_every_runnable_marker_is_collected() -> None:
    """A marker the collector would skip (a typo, a marker away from its fence) fails here, not silently."""
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        loose = len(re.findall(r"(?m)^\s*<!--\s*run\b", text))
        assert loose == len(marked_blocks(path, RUN_MARKER)), f"{path}: a run marker is malformed"


def _docs_hook():
    spec = importlib.util.spec_from_file_location("nanscope_docs_hook", ROOT / "docs" / "hooks" / "nanscope_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_codes_page_agrees_with_nanscope_codes() -> None:
    proc = subprocess.run([sys.executable, "-m", "nanscope", "codes"], env=_env(), capture_output=True, text=True,
                          timeout=120, check=True)
    entries = proc.stdout.splitlines()
    assert all(re.match(r"NS\d{3} ", line) for line in entries)  # one line per code, also off a terminal
    printed = [tuple(re.split(r"\s{2,}", e, maxsplit=2)) for e in entries]
    table = _docs_hook().codes_markdown().splitlines()[2:]
    rows = [tuple(c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)[1:4]) for row in table]
    assert len(printed) >= 30
    assert rows == printed


def test_synopses_list_every_flag_of_help() -> None:
    import argparse

    from nanscope.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    documented: dict[str, set[str]] = {}
    for path in DOC_FILES:
        for block in marked_blocks(path, SYNOPSIS_MARKER):
            documented.setdefault(block.marker.group(1), set()).update(FLAG.findall(block.text))
    assert set(documented) == set(sub.choices), "every subcommand has one synopsis in the docs"
    for name, parser in sub.choices.items():
        flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
        assert documented[name] == flags, (f"nanscope {name}: missing from the docs {sorted(flags - documented[name])}, "
                                           f"not in --help {sorted(documented[name] - flags)}")


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from nanscope.findings import CATALOGUE

    codes_page = (site / "codes" / "index.html").read_text(encoding="utf-8")
    assert all(f"<td>{code}</td>" in codes_page for code in CATALOGUE)
    import nanscope

    api_page = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [n for n in nanscope.__all__ if f'id="{nanscope._EXPORTS[n]}.{n}"' not in api_page]
    assert not missing, f"exports without a reference entry: {missing}"
