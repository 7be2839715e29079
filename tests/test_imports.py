"""The package's import graph: every module imports, and no two modules import each other, directly or
around a circle (function-local imports count: a circle dodged by a local import is still a circle;
imports under `if TYPE_CHECKING:` do not run and do not count)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanscope"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The nanscope modules `module` imports anywhere in its body (a package when no module is named)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for sub in node.body for n in ast.walk(sub)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def nearest(name: str) -> str:
        while name not in known and "." in name:
            name = name.rpartition(".")[0]
        return name

    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {nearest(a.name) for a in node.names if a.name.split(".")[0] == "nanscope"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "nanscope":
                continue
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else nearest(base) for a in node.names}
    out.discard(module)
    return out


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, target) for target in _imported(name, path, set(modules)))
    return graph


def test_the_graph_sees_function_local_imports() -> None:
    graph = import_graph()
    assert graph.has_edge("nanscope.replay.diagnose", "nanscope.replay.supervision")  # imported inside a function


def test_no_import_circles() -> None:
    circles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert not circles, "modules that import each other (move what both need one level down): " + "; ".join(
        " <-> ".join(c) for c in circles)


@pytest.mark.parametrize("module", sorted(m for m in _modules() if not m.endswith("__main__")))  # those run the CLI
def test_every_module_imports(module: str) -> None:
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as exc:  # an optional framework or provider that is not installed here
        if (exc.name or "").split(".")[0] == "nanscope":
            raise
        pytest.skip(f"{module} needs {exc.name}, not installed in this environment")
    assert imported.__name__ == module and Path(imported.__file__).resolve() == _modules()[module].resolve()
