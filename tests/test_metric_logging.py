"""Metric loggers: TensorBoard event files on local and S3 storage hold exactly the logged
numbers, a resumed stage's purge step drops the steps logged after its checkpoint, and a
missing tracking package is an error naming the extra to install."""

from __future__ import annotations

import math

from elo_ray import storage
from elo_ray.config import TrackingConfig
from elo_ray.train import metric_logging
from elo_ray.train.metric_logging import TensorBoardLogger, TrackingTarget
from tfevents import scalars

RECORDS = [
    {"step": 2, "loss": 5.25, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1234.5, "mfu": None,
     "peak_memory_gb": 1.5, "tokens_en": 256, "tokens_ko": 2304, "stopped": "no", "resumed_from_step": 0},
    {"step": 4, "loss": 4.5, "lr": 9e-4, "grad_norm": 0.5, "tokens_per_s": 1300.0, "mfu": 0.31,
     "peak_memory_gb": 1.5, "tokens_en": 512, "tokens_ko": 4608, "stopped": "no", "resumed_from_step": 0},
]


def expected(records) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in records:
        for k, v in metric_logging.scalars(r).items():
            out.setdefault(k, {})[r["step"]] = v
    return out


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for tag in want:
        assert sorted(got[tag]) == sorted(want[tag]), tag
        for step, v in want[tag].items():
            assert math.isclose(got[tag][step], v, rel_tol=1e-6), (tag, step)  # float32 in the file


def test_scalars_keep_numbers_and_drop_none_strings_and_the_step():
    assert metric_logging.scalars(RECORDS[0]) == {
        "loss": 5.25, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1234.5, "peak_memory_gb": 1.5,
        "tokens_en": 256.0, "tokens_ko": 2304.0, "resumed_from_step": 0.0,
    }


def test_tensorboard_local_event_files_hold_the_logged_values(tmp_path):
    logger = TensorBoardLogger(str(tmp_path / "tb"))
    for r in RECORDS:
        logger.log_dict(r, r["step"])
    logger.close()
    assert_same(scalars(str(tmp_path / "tb")), expected(RECORDS))


def test_tensorboard_on_s3_uploads_at_close(s3_bucket):
    uri = f"{s3_bucket}/run/pretrain/tensorboard"
    logger = TensorBoardLogger(uri, upload_every_s=3600)
    logger.log_dict(RECORDS[0], 2)
    assert storage.listdir(uri) == []  # not yet: uploads are throttled
    logger.log_dict(RECORDS[1], 4)
    logger.close()
    assert_same(scalars(uri), expected(RECORDS))


def test_tensorboard_on_s3_uploads_during_training_when_due(s3_bucket):
    uri = f"{s3_bucket}/run/align/tensorboard"
    logger = TensorBoardLogger(uri, upload_every_s=0)
    logger.log_dict(RECORDS[0], 2)
    assert_same(scalars(uri), expected(RECORDS[:1]))
    logger.close()


def test_resumed_stage_purges_the_steps_after_its_checkpoint(tmp_path):
    first = TensorBoardLogger(str(tmp_path / "tb"))
    for r in RECORDS:
        first.log_dict(r, r["step"])
    first.close()
    # the stage died after step 4 was logged, and resumes from its checkpoint at step 2
    again = metric_logging.build(TrackingTarget("r", "pretrain", tensorboard_uri=str(tmp_path / "tb")), resumed_from_step=2)
    redo = {**RECORDS[1], "loss": 4.0}
    again.log_dict(redo, 4)
    again.close()
    assert_same(scalars(str(tmp_path / "tb")), expected([RECORDS[0], redo]))


def test_target_for_a_stage_follows_the_tracking_section():
    off = TrackingTarget.for_stage(TrackingConfig(tensorboard=False), "r1", "align", "s3://b/r1/align", {})
    assert off.tensorboard_uri is None and off.wandb is None and off.mlflow is None
    cfg = TrackingConfig.model_validate({"wandb": {"project": "ko"}, "mlflow": {"experiment": "ko-cp"}})
    on = TrackingTarget.for_stage(cfg, "r1", "align", "s3://b/r1/align", {"lr": 1e-5})
    assert on.tensorboard_uri == "s3://b/r1/align/tensorboard"
    assert on.wandb == {"project": "ko", "entity": None}
    assert on.mlflow == {"experiment": "ko-cp", "tracking_uri": None}


def test_a_missing_tracking_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    problems = metric_logging.missing_backends(wandb=True, mlflow=False)
    assert problems == ["tracking.wandb: the wandb package is not installed; pip install 'elo-ray[wandb]' "
                        "(or remove tracking.wandb)"]
