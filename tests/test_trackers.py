"""The first bad step reaches the user's tracker: W&B (offline), MLflow (a local file store), TensorBoard (event files
read back with tensorboard's own reader); a tracker that fails never hides the NaN nor loses the dump."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

import nanscope.watch
from nanscope.integrations.trackers import TITLE
from nanscope.watch.report import NonFiniteStepError

PLANT = 1


def run_with_nan(tmp_path, **attach_kwargs) -> NonFiniteStepError:
    """Three steps of a small regression; step 1's input holds a NaN. Returns the error attach raised."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    crit = nanscope.watch.attach(lambda pred, y: {"loss_mse": (pred - y).pow(2).mean()}, tmp_path / "dumps",
                                 model=model, **attach_kwargs)
    with pytest.raises(NonFiniteStepError) as info:
        for step in range(3):
            x = torch.randn(2, 4)
            if step == PLANT:
                x[0, 0] = float("nan")
            crit(model(x), torch.zeros(2, 1))["loss_mse"].backward()
    return info.value


def test_wandb_offline_run_gets_the_alert_and_the_summary(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="nanscope-test", dir=str(tmp_path))
    alerts = []
    real_alert = wandb.alert  # init bound it to the run's alert

    def recording_alert(**kw):  # the real call runs; offline W&B keeps alerts in its binary run file only
        alerts.append(kw)
        return real_alert(**kw)

    monkeypatch.setattr(wandb, "alert", recording_alert)
    err = run_with_nan(tmp_path)
    run.finish()
    assert len(alerts) == 1 and f"nanscope inspect {err.report.dump}" in alerts[0]["text"]
    # offline, W&B keeps the run (summary and alert records) in its binary .wandb file for `wandb sync`
    (record,) = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    for _ in range(100):  # wandb-core may still be writing it when finish() returns
        data = record.read_bytes()
        if TITLE.encode() in data and str(err.report.dump).encode() in data:
            break
        time.sleep(0.2)
    assert data.count(TITLE.encode()) == 1  # the alert
    for key in (b"nanscope/verdict", b"nanscope/dump", b"loss_mse=nan", str(err.report.dump).encode()):
        assert key in data, key


def test_mlflow_file_store_gets_tags_and_the_report_page(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    try:
        with mlflow.start_run() as run:
            err = run_with_nan(tmp_path)
        data = mlflow.get_run(run.info.run_id).data
        assert data.tags["nanscope/step"] == str(PLANT) and data.tags["nanscope/dump"] == str(err.report.dump)
        names = [f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "nanscope")]
        assert sorted(names) == ["nanscope/manifest.json", "nanscope/nanscope-report.html"]
        page = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                   artifact_path="nanscope/nanscope-report.html",
                                                   dst_path=str(tmp_path / "dl"))
        assert "loss_mse=nan" in open(page, encoding="utf-8").read()
    finally:
        mlflow.set_tracking_uri(None)


def test_tensorboard_writer_gets_a_text_summary(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    err = run_with_nan(tmp_path, trackers=[writer])
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    (event,) = acc.Tensors("nanscope/verdict/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == PLANT and "loss_mse=nan" in text and str(err.report.dump) in text
    assert [s.value for s in acc.Scalars("nanscope/nonfinite_steps")] == [1.0]


def test_a_tracker_that_fails_warns_and_the_nan_and_dump_still_come(tmp_path):
    class Broken:
        def add_text(self, *a, **k):
            raise OSError("disk quota exceeded")

    with pytest.warns(RuntimeWarning, match="reporting it failed: tracker Broken: OSError: disk quota exceeded"):
        err = run_with_nan(tmp_path, trackers=[Broken(), "nonsense"])
    assert err.report.step == PLANT and (err.report.dump / "checkpoint.pth").is_file()
    assert os.listdir(tmp_path / "dumps") == [f"step{PLANT:08d}-rank0"]
