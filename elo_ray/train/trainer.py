"""The driver side of a training stage: check the inputs, run the worker loop on Ray Train.

`run_training` fails fast on what it can check without workers (sequence length, method,
trainable parameters, schedule length), then runs `TorchTrainer` with FSDP2 workers. Running it
again with the same `name` and `storage_uri` resumes the run from its latest checkpoint, also with
another `resources.num_workers` (`state.TrainState.reshard`); a worker that dies mid-run is
restarted from there up to `resources.max_failures` times.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from elo_ray import logs, storage
from elo_ray.config import ResourcesConfig, TrainConfig
from elo_ray.train import model as model_lib
from elo_ray.train.errors import ERRORS, DivergedError, TrainingError
from elo_ray.train.loop import ERROR_FILE, METRICS_FILE, LoopConfig, train_loop_per_worker
from elo_ray.train.metric_logging import TrackingTarget
from elo_ray.train.reader import BatchReader


@dataclass
class TrainResult:
    """What a finished stage produced."""

    export_uri: str  # the trained model as a HF checkpoint
    metrics: dict  # the final metrics (those of the last checkpoint)
    steps: int  # optimizer steps done in total
    resumed_from_step: int  # step the last attempt started from (0: from scratch)
    metrics_uri: str  # JSON lines, one record per log interval
    checkpoint_uri: str | None  # the latest checkpoint in the run's storage


def model_config(model_uri: str):
    """The HF config of the checkpoint at `model_uri` (local path or URI), read on the driver."""
    config_uri = storage.join(model_uri, "config.json")
    if not storage.exists(config_uri):
        raise TrainingError(f"{model_uri} has no config.json: expected a Hugging Face checkpoint directory")
    with tempfile.TemporaryDirectory() as tmp:
        storage.write_bytes(os.path.join(tmp, "config.json"), storage.read_bytes(config_uri))
        return model_lib.read_config(tmp)


def plan_steps(train: TrainConfig, reader: BatchReader, num_workers: int, seq_len: int) -> int:
    """Optimizer steps of the schedule: `train.max_steps`, else what the stream's totals give."""
    if train.max_steps:
        return train.max_steps
    totals = reader.totals() or {}
    sequences = totals.get("sequences")
    if not isinstance(sequences, int) and isinstance(totals.get("tokens"), int):
        sequences = totals["tokens"] // seq_len
    if not isinstance(sequences, int):
        raise TrainingError("the data stream does not know its length; set train.max_steps")
    per_step = num_workers * train.micro_batch_size * train.grad_accum
    steps = sequences // per_step
    if steps < 1:
        raise TrainingError(
            f"the data stream has {sequences} sequences, fewer than one step needs "
            f"({num_workers} workers x micro_batch_size {train.micro_batch_size} x grad_accum {train.grad_accum})"
        )
    return steps


def run_training(
    *,
    name: str,
    model_uri: str,
    output_uri: str,
    storage_uri: str,
    train: TrainConfig,
    resources: ResourcesConfig,
    plan: Any,
    seq_len: int,
    extra_metrics_uri: str | None = None,
    tracking: TrackingTarget | None = None,
) -> TrainResult:
    """Train the model at `model_uri` on `plan`'s stream and export it to `output_uri`.

    `plan` has `.datasets` and `.dataset_config` (handed to TorchTrainer) and `.reader` (a
    `BatchReader`, handed to the workers). The run lives at `{storage_uri}/{name}`: checkpoints,
    `metrics.jsonl`; `tracking` names TensorBoard, W&B and MLflow destinations. Raises `TrainingError` (or its subclasses `CheckpointMismatchError`,
    `DivergedError`) for problems a retry cannot fix."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if storage.location(output_uri) == storage.location(model_uri):
        raise TrainingError(f"output_uri {output_uri} is the input checkpoint; export the trained model elsewhere")
    config = model_config(model_uri)
    model_lib.check_fits(config, train.method, seq_len, train.micro_batch_size)
    model_lib.build_meta(config, train)  # meta device: no memory; raises when nothing would train
    total_steps = plan_steps(train, plan.reader, resources.num_workers, seq_len)

    run_uri = storage.join(storage_uri, name)
    storage.remove(storage.join(run_uri, ERROR_FILE))
    fs, path = storage.pyarrow_filesystem(storage_uri)
    loop = LoopConfig(
        train=train, model_uri=model_uri, output_uri=output_uri, run_uri=run_uri,
        reader=plan.reader, total_steps=total_steps, extra_metrics_uri=extra_metrics_uri, tracking=tracking,
    )
    trainer = TorchTrainer(
        logs.in_workers(train_loop_per_worker),
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend=backend(resources, train)),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=plan.datasets,
        dataset_config=plan.dataset_config,
    )
    result = trainer.fit()

    error_uri = storage.join(run_uri, ERROR_FILE)
    if storage.exists(error_uri):
        record = json.loads(storage.read_text(error_uri))
        cls = ERRORS.get(record["type"], TrainingError)
        raise cls(record["message"], record["step"]) if cls is DivergedError else cls(record["message"])
    final = dict(result.metrics or {})
    return TrainResult(
        export_uri=output_uri,
        metrics=final,
        steps=int(final.get("step", 0)),
        resumed_from_step=int(final.get("resumed_from_step", 0)),
        metrics_uri=storage.join(run_uri, METRICS_FILE),
        checkpoint_uri=_uri_of(result.checkpoint, storage_uri),
    )


def backend(resources: ResourcesConfig, train: TrainConfig) -> str:
    """torch.distributed's backend: NCCL on GPUs, gloo on CPUs, and both when CPU offload leaves
    sharded parameters in host memory (their gradient norm and export gather them over gloo)."""
    if not resources.use_gpu:
        return "gloo"
    return "cpu:gloo,cuda:nccl" if train.offload_to_cpu else "nccl"


def _uri_of(checkpoint, storage_uri: str) -> str | None:
    if checkpoint is None:
        return None
    if storage.has_scheme(storage_uri):
        return f"{storage_uri.split('://', 1)[0]}://{checkpoint.path}"
    return checkpoint.path
