"""Where a training stage's metrics go besides metrics.jsonl: TensorBoard, W&B, MLflow.

One interface, torchtune's `MetricLoggerInterface`: `log_dict(metrics, step)` per log interval
and `close()` at the end. Rank 0 of a training stage builds one logger at set-up from a
`TrackingTarget` (what the spec's `tracking:` section asks, plus the stage and run id) and hands
every interval's metrics to it; the backends chosen by config receive the same numbers.

- TensorBoard (on by default): event files in `{run}/{stage}/tensorboard/`, written through
  tensorboardX into a local directory and, for object storage, uploaded with elo-ray's storage
  layer (one whole-object PUT per upload, the same credentials and retries as the rest of the
  run) at most every `upload_every_s` and at `close`. tensorboardX's own S3 writer needs boto3
  and its own endpoint variable, and knows no gs://; this way needs neither. A resumed stage
  starts a new event file with a purge step, so TensorBoard drops the old file's steps past
  the resumed checkpoint instead of drawing them twice.
- W&B (`tracking.wandb`): one run per stage, `group` = the run id, run id `{run_id}-{stage}` so
  that a resumed stage continues its W&B run. Credentials and mode from WANDB_API_KEY,
  WANDB_MODE, WANDB_BASE_URL, WANDB_DIR as W&B users set them.
- MLflow (`tracking.mlflow`): one run per stage, nested under a parent run named after the
  run id, tagged `elo_ray.run_id` and `elo_ray.stage`. The tracking server comes from
  `tracking.mlflow.tracking_uri` or MLFLOW_TRACKING_URI (and its usual credential variables).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Mapping, Protocol

from elo_ray import storage

TENSORBOARD_DIR = "tensorboard"
EXTRA = {"wandb": "wandb", "mlflow": "mlflow"}  # backend -> the elo-ray extra that installs it


class MetricLogger(Protocol):
    """What every backend implements (torchtune's MetricLoggerInterface, minus `log`)."""

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of a record (None, strings, booleans and the step itself left out)."""
    return {
        k: float(v) for k, v in metrics.items()
        if k != "step" and isinstance(v, Real) and not isinstance(v, bool)
    }


@dataclass
class TrackingTarget:
    """Everything rank 0 needs to build a stage's metric loggers (pickled to the workers)."""

    run_id: str
    stage: str
    tensorboard_uri: str | None = None  # {run}/{stage}/tensorboard; None: off
    wandb: dict | None = None  # {"project": ..., "entity": ...}; None: off
    mlflow: dict | None = None  # {"experiment": ..., "tracking_uri": ...}; None: off
    config: dict = field(default_factory=dict)  # the stage's settings, recorded with the run

    @classmethod
    def for_stage(cls, tracking, run_id: str, stage: str, stage_uri: str, config: dict) -> "TrackingTarget":
        """The destinations a `TrackingConfig` asks for, for one stage of one run."""
        return cls(
            run_id=run_id,
            stage=stage,
            tensorboard_uri=storage.join(stage_uri, TENSORBOARD_DIR) if tracking.tensorboard else None,
            wandb=tracking.wandb.model_dump() if tracking.wandb else None,
            mlflow=tracking.mlflow.model_dump() if tracking.mlflow else None,
            config=config,
        )


class TensorBoardLogger:
    """Scalars into a TensorBoard event file at `uri` (a local directory or an object-storage prefix).

    Events are written synchronously (tensorboardX's `EventsWriter`, its `SummaryWriter` queues
    them to a thread that `flush` does not wait for), so what is uploaded holds every step logged.
    """

    def __init__(self, uri: str, purge_step: int | None = None, upload_every_s: float = 30.0):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.uri = uri
        self.remote = storage.has_scheme(uri)
        self.local = tempfile.mkdtemp(prefix="elo-ray-tensorboard-") if self.remote else uri.removeprefix("file://")
        os.makedirs(self.local, exist_ok=True)
        # the nanoseconds keep two writers started in the same second (a quick resume) apart
        self.writer = EventsWriter(os.path.join(self.local, "events"), filename_suffix=f".{time.time_ns()}")
        if purge_step is not None:  # TensorBoard drops earlier files' events from this step on
            self.writer.write_event(Event(wall_time=time.time(), step=purge_step,
                                          session_log=SessionLog(status=SessionLog.START)))
        self.writer.flush()
        self.upload_every_s = upload_every_s
        self.uploaded_at = time.monotonic()

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=v) for k, v in scalars(metrics).items()]
        self.writer.write_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self.writer.flush()
        if self.remote and time.monotonic() - self.uploaded_at >= self.upload_every_s:
            self.upload()

    def upload(self) -> None:
        """Copy the event file to the storage prefix (a whole-object write: never half there)."""
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as f:
                storage.write_bytes(storage.join(self.uri, name), f.read())
        self.uploaded_at = time.monotonic()

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            self.upload()
            shutil.rmtree(self.local, ignore_errors=True)


class WandBLogger:
    """One W&B run per stage, grouped by the elo-ray run id; resumed stages continue their run."""

    def __init__(self, target: TrackingTarget, project: str, entity: str | None = None):
        import wandb

        self.run = wandb.init(
            project=project, entity=entity, group=target.run_id, job_type=target.stage,
            name=f"{target.run_id}/{target.stage}", id=_run_key(target), resume="allow",
            config={"run_id": target.run_id, "stage": target.stage, **target.config},
        )

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log(scalars(metrics), step=step, commit=True)  # one record per step: write it now

    def close(self) -> None:
        self.run.finish()


class MLflowLogger:
    """One MLflow run per stage, nested under a parent run per elo-ray run id."""

    def __init__(self, target: TrackingTarget, experiment: str, tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        parent = self._find_or_create(target.run_id, {"elo_ray.run_id": target.run_id, "elo_ray.stage": "(run)"})
        tags = {"elo_ray.run_id": target.run_id, "elo_ray.stage": target.stage, "mlflow.parentRunId": parent}
        self.run_id = self._find_or_create(f"{target.run_id}/{target.stage}", tags)
        for key, value in _flat(target.config).items():
            try:
                self.client.log_param(self.run_id, key, value)
            except Exception:  # a resumed stage: MLflow refuses to change a logged param, the same one is fine
                pass

    def _find_or_create(self, name: str, tags: dict[str, str]) -> str:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items() if k.startswith("elo_ray."))
        found = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        if found:
            return found[0].info.run_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in scalars(metrics).items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class MetricLoggers:
    """Fans each call out to every configured backend."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log_dict(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build(target: TrackingTarget | None, resumed_from_step: int = 0) -> MetricLoggers:
    """The loggers `target` asks for; `resumed_from_step` > 0 when the stage resumed from a checkpoint."""
    loggers: list[MetricLogger] = []
    if target is None:
        return MetricLoggers(loggers)
    if target.tensorboard_uri:
        purge = resumed_from_step + 1 if resumed_from_step else None
        loggers.append(TensorBoardLogger(target.tensorboard_uri, purge_step=purge))
    if target.wandb is not None:
        loggers.append(WandBLogger(target, **target.wandb))
    if target.mlflow is not None:
        loggers.append(MLflowLogger(target, **target.mlflow))
    return MetricLoggers(loggers)


def missing_backends(wandb: bool, mlflow: bool) -> list[str]:
    """Problem lines for configured backends whose package is not installed."""
    import importlib.util

    asked = [name for name, on in (("wandb", wandb), ("mlflow", mlflow)) if on]
    return [
        f"tracking.{name}: the {name} package is not installed; pip install 'elo-ray[{EXTRA[name]}]' "
        f"(or remove tracking.{name})"
        for name in asked if importlib.util.find_spec(name) is None
    ]


def _run_key(target: TrackingTarget) -> str:
    return f"{target.run_id}-{target.stage}"


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out
