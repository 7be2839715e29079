"""The one result object every writer reads (terminal, HTML, JSON, CI), and its JSON form.

`Result.to_dict()` is deterministic for the same inputs (sorted keys, no timestamps), versioned by
`SCHEMA`. Tensors that figures need live in `artifacts` and are written to a sidecar file, not JSON.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any, Mapping

from nanscope import progress
from nanscope.causes import Group, group, linked_dicts
from nanscope.findings import Finding, Severity, _jsonable, worst_severity

SCHEMA = "nanscope.result/1"


@dataclass(frozen=True)
class Check:
    """One verify-fix check: PASS or FAIL with the numbers behind it."""

    id: int
    name: str
    passed: bool
    detail: str
    numbers: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "passed": bool(self.passed), "detail": self.detail,
                "numbers": _jsonable(dict(self.numbers))}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Check":
        return cls(int(d["id"]), d["name"], bool(d["passed"]), d.get("detail", ""), d.get("numbers", {}))


@dataclass
class Result:
    kind: str  # "inspect" | "verify-fix" | "watch"
    findings: list[Finding] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # images, boxes, layers, tokens, ...
    inputs: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    loss_terms: dict[str, Any] = field(default_factory=dict)  # name -> float (inspect: the user's criterion)
    tables: dict[str, Any] = field(default_factory=dict)  # verify-fix: before/after per term, steps, memory
    artifacts: dict[str, Any] = field(default_factory=dict)  # tensors for figures (sidecar, not JSON)
    # How long each stage of the command took so far, when a progress listener is installed (the CLI
    # installs one): the terminal and HTML reports show it; the JSON never does, so it stays byte-identical.
    timings: list[progress.Timing] = field(default_factory=progress.finished)
    user_stdout: str = ""  # what the user's criterion printed (shown in its own block, never interleaved)
    model_stdout: str = ""  # what the model's own code printed during the replay (groundingdino's NaN prints)

    def __post_init__(self) -> None:
        self.findings = [f for g in group(self.findings) for f in g.findings]  # by cause (nanscope.causes)

    @property
    def groups(self) -> list[Group]:
        """One group per cause: the cause (at the worst severity it explains), then what it explains."""
        key = tuple(map(id, self.findings))  # findings are frozen: the same objects group the same way
        cached = self.__dict__.get("_groups")
        if cached is None or cached[0] != key:
            cached = (key, group(self.findings))
            self.__dict__["_groups"] = cached
        return cached[1]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def failed_required(self) -> list[Check]:
        """Failed checks that decide the verdict: those in `summary["required_checks"]` (all when absent)."""
        required = self.summary.get("required_checks")
        return [c for c in self.failed_checks if required is None or c.id in required]

    @property
    def verdict(self) -> str:
        """inspect: 'broken' or 'clean'; verify-fix: 'fixed' (every required check passes) or 'not fixed'."""
        if self.kind == "verify-fix":
            return "not fixed" if self.failed_required else "fixed"
        return "broken" if self.errors else "clean"

    @property
    def exit_code(self) -> int:
        """0 clean / required checks pass, 1 an error finding or a failed required check (2: the CLI's, bad input)."""
        if self.kind == "verify-fix":
            return 1 if self.failed_required else 0
        return 1 if self.errors else 0

    @property
    def worst(self) -> Severity | None:
        return worst_severity(self.findings)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "schema": SCHEMA,
            "kind": self.kind,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "findings": linked_dicts(self.groups),
            "checks": [c.to_dict() for c in self.checks],
            "summary": self.summary,
            "inputs": self.inputs,
            "environment": self.environment,
            "loss_terms": self.loss_terms,
            "tables": self.tables,
            **({"user_stdout": self.user_stdout} if self.user_stdout else {}),
            **({"model_stdout": self.model_stdout} if self.model_stdout else {}),
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Result":
        return cls(
            kind=d["kind"],
            findings=[Finding.from_dict(f) for f in d.get("findings", [])],
            checks=[Check.from_dict(c) for c in d.get("checks", [])],
            summary=dict(d.get("summary", {})),
            inputs=dict(d.get("inputs", {})),
            environment=dict(d.get("environment", {})),
            loss_terms=dict(d.get("loss_terms", {})),
            tables=dict(d.get("tables", {})),
            user_stdout=str(d.get("user_stdout", "")),
            model_stdout=str(d.get("model_stdout", "")),
        )


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and device, for reports. Deterministic on one machine."""
    import importlib.metadata as md

    import torch

    from nanscope.stacks.groundingdino.provider import environment_fields

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env: dict[str, Any] = {
        "nanscope": version("nanscope"),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        **environment_fields(),  # the version of whichever distribution provides `groundingdino`, and its name
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return env
