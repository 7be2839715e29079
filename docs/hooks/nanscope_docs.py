"""MkDocs hook: the pages generated from the code, so they cannot drift from it.

`<!-- nanscope:codes -->` in a page becomes the finding-code table from `nanscope.findings.CATALOGUE`;
`<!-- nanscope:api -->` becomes one mkdocstrings block per public name of `nanscope.__all__`, grouped by the
module that defines it (read from `nanscope._EXPORTS`), so the reference follows the code wherever it moves.
tests/test_docs.py imports this file and compares its table with `nanscope codes`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

CODES_MARKER = "<!-- nanscope:codes -->"
API_MARKER = "<!-- nanscope:api -->"


def _import_nanscope() -> Any:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import nanscope

    return nanscope


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def codes_markdown() -> str:
    """The finding-code table: code, default severity, title, fix hint, in catalogue order."""
    _import_nanscope()
    from nanscope.findings import CATALOGUE

    rows = ["| code | severity | title | fix hint |", "|---|---|---|---|"]
    for info in CATALOGUE.values():
        rows.append(f"| {info.code} | {info.severity.value} | {_cell(info.title)} | {_cell(info.hint)} |")
    return "\n".join(rows) + "\n"


def api_markdown() -> str:
    """One `::: module.name` block per exported name, grouped under the module that defines it."""
    nanscope = _import_nanscope()
    by_module: dict[str, list[str]] = {}
    for name in nanscope.__all__:
        by_module.setdefault(nanscope._EXPORTS[name], []).append(name)
    out: list[str] = []
    for module in sorted(by_module):
        out.append(f"## `{module}`\n")
        for name in by_module[module]:
            out.append(f"::: {module}.{name}\n")
    return "\n".join(out)


def _expand(markdown: str, marker: str, render: Any) -> str:
    """Replace `marker` where it stands alone on a line (a marker quoted in the text stays as it is)."""
    lines = markdown.split("\n")
    if marker not in (line.strip() for line in lines):
        return markdown
    text = render()
    return "\n".join(text if line.strip() == marker else line for line in lines)


def on_page_markdown(markdown: str, **_: Any) -> str:
    markdown = _expand(markdown, CODES_MARKER, codes_markdown)
    return _expand(markdown, API_MARKER, api_markdown)
