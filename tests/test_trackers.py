"""W&B and MLflow backends, each against its real library offline: MLflow's file store
(MLFLOW_ALLOW_FILE_STORE, MLflow 3 keeps it in maintenance mode) and W&B's offline mode.
Skipped where the `mlflow` / `wandb` extras are not installed (CI installs neither)."""

from __future__ import annotations

import pytest

from elo_ray.train import metric_logging
from elo_ray.train.metric_logging import TrackingTarget

RECORDS = [{"step": 2, "loss": 5.5, "lr": 1e-3, "mfu": None, "tokens_ko": 2304},
           {"step": 4, "loss": 4.25, "lr": 9e-4, "mfu": None, "tokens_ko": 4608}]


def test_mlflow_run_per_stage_nested_under_the_run_id(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path / 'mlruns'}"
    runs = {}
    for stage in ("pretrain", "align"):
        target = TrackingTarget("ko-2026-11-29", stage, mlflow={"experiment": "elo", "tracking_uri": uri},
                                config={"lr": 1e-3, "betas": [0.9, 0.95]})
        logger = metric_logging.build(target)
        for r in RECORDS:
            logger.log_dict(r, r["step"])
        logger.close()
        runs[stage] = logger.loggers[0].run_id
    client = MlflowClient(uri)
    pre, align = client.get_run(runs["pretrain"]), client.get_run(runs["align"])
    assert pre.info.run_name == "ko-2026-11-29/pretrain" and pre.info.status == "FINISHED"
    assert pre.data.tags["mlflow.parentRunId"] == align.data.tags["mlflow.parentRunId"]
    parent = client.get_run(pre.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "ko-2026-11-29" and parent.data.tags["elo_ray.run_id"] == "ko-2026-11-29"
    assert pre.data.params == {"lr": "0.001", "betas": "[0.9, 0.95]"}
    assert [(m.step, m.value) for m in client.get_metric_history(pre.info.run_id, "loss")] == [(2, 5.5), (4, 4.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(pre.info.run_id, "tokens_ko")] == [(2, 2304), (4, 4608)]
    # a resumed stage logs into the same run
    again = metric_logging.build(TrackingTarget("ko-2026-11-29", "pretrain", mlflow={"experiment": "elo", "tracking_uri": uri},
                                                config={"lr": 1e-3, "betas": [0.9, 0.95]}), resumed_from_step=4)
    assert again.loggers[0].run_id == runs["pretrain"]
    again.close()


def test_wandb_offline_run_per_stage_grouped_by_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    target = TrackingTarget("ko-2026-11-29", "align", wandb={"project": "elo", "entity": None}, config={"lr": 1e-5})
    logger = metric_logging.build(target)
    run = logger.loggers[0].run
    assert (run.group, run.name, run.id, run.job_type) == ("ko-2026-11-29", "ko-2026-11-29/align", "ko-2026-11-29-align", "align")
    assert run.config["lr"] == 1e-5 and run.config["stage"] == "align"
    for r in RECORDS:
        logger.log_dict(r, r["step"])
    assert run.summary["loss"] == 4.25 and run.summary["tokens_ko"] == 4608 and "mfu" not in run.summary.keys()
    logger.close()
    assert list(tmp_path.glob("wandb/offline-run-*-ko-2026-11-29-align/run-ko-2026-11-29-align.wandb"))
