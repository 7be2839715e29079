"""The first bad step's verdict and dump path in the user's experiment tracker: W&B, MLflow, TensorBoard.

`alert_trackers(report, trackers)` sends one alert per tracker and returns what failed (it never
raises: a tracker that cannot log must not hide the NaN, and the dump is written before). Trackers:

    "auto"                       W&B's active run (`wandb.run`) and MLflow's (`mlflow.active_run()`), when
                                 the program imported them; nothing is imported here otherwise
    a SummaryWriter              TensorBoard: `add_text("nanscope/verdict", ...)` (anything with `add_text`)
    a Lightning MLFlowLogger     its MlflowClient and run_id (anything with `.experiment` and `.run_id`)
    "wandb", "mlflow"            the active run of that one tracker

W&B gets `wandb.alert` and the run summary (`nanscope/verdict`, `nanscope/dump`, ...); MLflow gets
tags and the dump's report page (`nanscope-report.html`) and manifest as artifacts. This module
imports nothing of nanscope's, so `nanscope.watch` can call it without an import circle.
"""

from __future__ import annotations

import html
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

TITLE = "nanscope: non-finite training step"


def _facts(report: Any, nonfinite_steps: int) -> dict[str, Any]:
    verdict = report.findings[0].message if report.findings else f"step {report.step} went bad"
    return {"nanscope/verdict": verdict, "nanscope/dump": None if report.dump is None else str(report.dump),
            "nanscope/step": report.step, "nanscope/reason": report.reason, "nanscope/rank": report.rank,
            "nanscope/nonfinite_steps": nonfinite_steps,
            "nanscope/nonfinite_terms": ", ".join(report.nonfinite_terms)}


def _text(facts: dict[str, Any]) -> str:
    dump = facts["nanscope/dump"]
    replay = f"\nreplay: nanscope inspect {dump}" if dump else "\n(the dump could not be written)"
    return f"{facts['nanscope/verdict']}{replay}"


def report_html(report: Any, facts: dict[str, Any]) -> str:
    """A one-page report of the bad step (the finding, the loss terms, the replay command)."""
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in report.loss_terms.items())
    dump = facts["nanscope/dump"]
    return (f"<!doctype html><meta charset='utf-8'><title>{TITLE}</title><h1>{TITLE}</h1>"
            f"<p><b>{html.escape(facts['nanscope/verdict'])}</b></p>"
            f"<p>step {report.step}, rank {report.rank} of {report.world_size}, reason {html.escape(str(report.reason))}"
            f"</p><h2>loss terms</h2><table>{rows}</table>"
            + (f"<p>replay: <code>nanscope inspect {html.escape(dump)}</code></p>" if dump else "")
            + f"<pre>{html.escape(json.dumps(report.to_dict(), indent=1, default=str))}</pre>")


def _wandb(facts: dict[str, Any]) -> bool:
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return False
    for k, v in facts.items():
        run.summary[k] = v
    wandb.alert(title=TITLE, text=_text(facts)[:1000], level=wandb.AlertLevel.ERROR)
    return True


def _mlflow_files(report: Any, facts: dict[str, Any], folder: Path) -> list[Path]:
    page = folder / "nanscope-report.html"
    page.write_text(report_html(report, facts), encoding="utf-8")
    files = [page]
    if report.dump is not None and (Path(report.dump) / "manifest.json").is_file():
        files.append(Path(report.dump) / "manifest.json")
    return files


def _mlflow_active(report: Any, facts: dict[str, Any]) -> bool:
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return False
    mlflow.set_tags({k: str(v) for k, v in facts.items()})
    with tempfile.TemporaryDirectory(prefix="nanscope-mlflow-") as tmp:
        for f in _mlflow_files(report, facts, Path(tmp)):
            mlflow.log_artifact(str(f), artifact_path="nanscope")
    return True


def _mlflow_client(handle: Any, report: Any, facts: dict[str, Any]) -> None:
    client, run_id = handle.experiment, handle.run_id
    for k, v in facts.items():
        client.set_tag(run_id, k, str(v))
    with tempfile.TemporaryDirectory(prefix="nanscope-mlflow-") as tmp:
        for f in _mlflow_files(report, facts, Path(tmp)):
            client.log_artifact(run_id, str(f), artifact_path="nanscope")


def _tensorboard(writer: Any, report: Any, facts: dict[str, Any]) -> None:
    step = int(report.step or 0)
    writer.add_text("nanscope/verdict", _text(facts).replace("\n", "  \n"), global_step=step)
    if hasattr(writer, "add_scalar"):
        writer.add_scalar("nanscope/nonfinite_steps", facts["nanscope/nonfinite_steps"], global_step=step)
    if hasattr(writer, "flush"):
        writer.flush()


def alert_trackers(report: Any, trackers: Sequence[Any] | str, *, nonfinite_steps: int = 1) -> list[str]:
    """Send `report` (a WatchReport) to `trackers`; return one line per tracker that failed."""
    facts = _facts(report, nonfinite_steps)
    handles = ["wandb", "mlflow"] if trackers == "auto" else ([trackers] if isinstance(trackers, str) else trackers)
    problems: list[str] = []
    for h in handles:
        try:
            if h == "wandb":
                _wandb(facts)
            elif h == "mlflow":
                _mlflow_active(report, facts)
            elif hasattr(h, "add_text"):
                _tensorboard(h, report, facts)
            elif hasattr(h, "experiment") and hasattr(h, "run_id"):
                _mlflow_client(h, report, facts)
            else:
                problems.append(f"tracker {type(h).__name__}: not a SummaryWriter, an MLflow logger, 'wandb' or "
                                "'mlflow'")
        except Exception as exc:  # noqa: BLE001 (never hide the NaN behind a tracker's error)
            problems.append(f"tracker {h if isinstance(h, str) else type(h).__name__}: {type(exc).__name__}: {exc}")
    return problems
