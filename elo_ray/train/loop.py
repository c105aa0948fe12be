"""The worker loop: the one training loop of every stage, run by Ray Train in each worker.

A stage differs only in what `LoopConfig` names: the model (a detached ELO model, or the full
merged model), the trainable parameters (`train.method`), the data (`reader`) and the
hyper-parameters (`train`). Per optimizer step the loop:

1. takes `grad_accum` micro-batches from the reader and checks they fit the model (collective:
   every rank learns of a bad batch on any rank, so they stop together);
2. runs forward/backward with the causal-LM loss summed over the label tokens (labels -100
   carry no loss) and divided by the step's label tokens on all ranks, so that accumulation and
   data parallelism give the same gradient as one big batch (tests/test_train_equivalence.py);
3. clips the gradient norm, stops on a NaN/inf loss or norm *before* the update (so no checkpoint
   of a bad state exists), steps AdamW and the schedule;
4. every `log_every` steps reports metrics to Ray Train and prints a progress line; every
   `checkpoint_every` steps (and at the end) saves a sharded checkpoint of the model, the
   optimizer and the train state (`state.TrainState`).

A run resumes from its latest checkpoint, also on another number of workers: DCP reshards the
model and optimizer, the global batch and the schedule stay as they were, and the data stream
continues after the sequences of each language trained so far (`TrainState.reshard`). On the same
workers it may resume with other performance-only settings (activation checkpointing, offload,
the loss kernel, ...) and with each step's sequences split into other micro-batches
(`TrainState.resplit`): the stream is replayed exactly to where it stopped.

At the end it exports the trained model as a HF checkpoint at `output_uri`. Errors that a retry
cannot fix (`TrainingError`) end every worker cleanly and are recorded in `error.json` in the
run's storage, from which `run_training` raises them on the driver.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import ray.train
import torch
import torch.distributed as dist

from elo_ray import storage
from elo_ray.config import TrainConfig
from elo_ray.train import checkpoint, export, metric_logging, metrics
from elo_ray.train import model as model_lib
from elo_ray.train.errors import DivergedError, TrainingError
from elo_ray.train.optim import build_optimizer
from elo_ray.train.reader import Batch, BatchReader
from elo_ray.train.state import DataPosition, TrainState
from elo_ray.train.step import BatchStats, check_batches, train_step

log = logging.getLogger(__name__)
ERROR_FILE = "error.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class LoopConfig:
    """Everything a worker needs to run a stage (pickled to every worker)."""

    train: TrainConfig
    model_uri: str  # HF checkpoint to start from (local path or URI)
    output_uri: str  # where the trained model is exported
    run_uri: str  # the run's storage: {storage_uri}/{name}; metrics.jsonl and error.json live here
    reader: BatchReader
    total_steps: int  # optimizer steps of the schedule (data may end it earlier); a resumed run keeps its own
    extra_metrics_uri: str | None = None  # a second copy of metrics.jsonl (e.g. the stage's directory)
    tracking: metric_logging.TrackingTarget | None = None  # TensorBoard, W&B, MLflow (rank 0 logs)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `TorchTrainer(train_loop_per_worker, train_loop_config={"loop": ...})`."""
    loop: LoopConfig = config["loop"]
    worker = Worker(loop)
    try:
        worker.set_up()
        worker.resume()
        worker.train()
        worker.export()
    except TrainingError as e:
        # Raised on every rank at the same point (checks are collective): end cleanly so that
        # Ray Train does not retry what cannot succeed, and leave the reason for the driver.
        if worker.rank == 0:
            if worker.log is not None:  # keep the curve up to the failure
                worker.log.write()
            if worker.metric_logger is not None:
                worker.metric_logger.close()
            record = {"type": type(e).__name__, "message": str(e), "step": getattr(e, "step", None)}
            storage.write_text(storage.join(loop.run_uri, ERROR_FILE), json.dumps(record))


class Worker:
    """One rank's view of the stage, read top to bottom: `set_up` (model shard, optimizer, train
    state), `resume` (from the run's latest checkpoint, on any number of workers), `train` (the
    optimizer steps, metrics and checkpoints), `export` (the trained model as a HF checkpoint)."""

    def __init__(self, loop: LoopConfig):
        self.loop = loop
        self.train_cfg = loop.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.device = ray.train.torch.get_device()
        self.log: metrics.MetricsLog | None = None  # rank 0's records, once the run's are read back
        self.progress: metrics.Progress | None = None  # rank 0's progress lines (ETA), once resumed
        self.metric_logger: metric_logging.MetricLoggers | None = None  # rank 0's TensorBoard, W&B, MLflow
        self.report_every_s = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))
        self.last_report = time.monotonic()

    # ------------------------------------------------------------------ set-up

    def set_up(self) -> None:
        """Build the sharded model, the optimizer and a fresh train state for step 0."""
        from torch.distributed.device_mesh import init_device_mesh

        t = self.train_cfg
        torch.manual_seed(t.seed)
        mesh = init_device_mesh(self.device.type, (self.world,))
        self.model_dir = model_lib.fetch(self.loop.model_uri, self.local_rank)
        self.stage = model_lib.build(self.model_dir, t, self.device, mesh)
        self.model = self.stage.module
        self.config = self.stage.config
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.state = TrainState(
            data=DataPosition(world=self.world, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum),
            total_steps=self.loop.total_steps,
            optimizer=self.optimizer,
            train=t,
            fingerprint=checkpoint.fingerprint(self.model, self.config, t.method),
        )
        mp = model_lib.mixed_precision(t.precision, self.device)
        self.compute_dtype = mp.param_dtype if mp is not None else torch.float32
        self.peak = metrics.peak_tflops(self.device, self.compute_dtype)

    # ------------------------------------------------------------------ resume

    def resume(self) -> None:
        """Continue from the run's latest checkpoint, if there is one; on another number of
        workers, DCP reshards the model and optimizer and the state continues the data stream
        (`TrainState.reshard`)."""
        saved = checkpoint.restore(self.model, self.optimizer, self.state)
        self.resumed_from = self.state.step
        self.last_checkpoint = self.state.step if saved else None
        if saved:
            t, data = self.train_cfg, self.state.data
            record = {"from_step": self.state.step, "old_world": data.world, "new_world": self.world}
            if data.world != self.world:
                record = self.state.reshard(self.world, t.micro_batch_size)
                record["max_sequences_repeated_or_skipped"] = self.loop.reader.resume_bound(record["old_world"])
            else:
                if (data.micro_batch_size, data.grad_accum) != (t.micro_batch_size, t.grad_accum):
                    record = self.state.resplit(t.micro_batch_size, t.grad_accum)
                record["max_sequences_repeated_or_skipped"] = 0  # the same stream, replayed to where it stopped
            self.state.resumed.append(record)
        if self.rank == 0:
            self.progress = metrics.Progress(self.state.total_steps)
            self.log = metrics.MetricsLog.resume(storage.join(self.loop.run_uri, METRICS_FILE), self.state.step)
            self.metric_logger = metric_logging.build(self.loop.tracking, resumed_from_step=self.state.step)
            log.info(f"{self.train_cfg.method}: {self._start_line(saved)}; {len(self.stage.trainable)} "
                     f"trainable tensors, {self.state.total_steps} steps, {self.world} worker(s) on {self.device.type}"
                     + (f" ({torch.get_num_threads()} threads each)" if self.device.type == "cpu" else ""))

    def _start_line(self, saved: bool) -> str:
        if not saved:
            return "starting"
        r = self.state.resumed[-1]
        if "was" in r:
            return (f"resuming from step {self.state.step} with micro_batch_size {r['micro_batch_size']} x grad_accum "
                    f"{r['grad_accum']} per worker (was {r['was']['micro_batch_size']} x {r['was']['grad_accum']}); "
                    "the same sequences per step")
        if r["old_world"] == r["new_world"]:
            return f"resuming from step {self.state.step}"
        return (f"resuming from step {self.state.step} on {r['new_world']} workers (was {r['old_world']}): "
                f"{self.state.global_batch} sequences per step as before, micro_batch_size {r['micro_batch_size']} "
                f"x grad_accum {r['grad_accum']} per worker; the data stream continues after the sequences "
                f"trained, within {r['max_sequences_repeated_or_skipped']} sequences per language")

    # ------------------------------------------------------------------ training

    def train(self) -> None:
        """Optimizer steps until the schedule ends or the data does; metrics every `log_every`
        steps, a checkpoint every `checkpoint_every` steps and at the end."""
        t, state, data = self.train_cfg, self.state, self.state.data
        batches = iter(self.loop.reader.batches(data.micro_batch_size, skip=data.micro_batches, start=data.start))
        interval = _Interval()
        while state.step < state.total_steps:
            waited = time.perf_counter()
            micro = [b for _, b in zip(range(data.grad_accum), batches)]
            interval.data_wait += time.perf_counter() - waited
            if len(micro) < data.grad_accum:  # every worker yields the same count: all stop here
                if state.step == 0:
                    raise TrainingError(
                        f"the data stream ended before the first step: fewer than grad_accum={data.grad_accum} "
                        f"micro-batches of {data.micro_batch_size} sequences per worker; add data or lower them"
                    )
                break
            loss, grad_norm, stats = self.optimizer_step(micro)
            state.advance(stats.tokens)
            flops = stats.tokens * metrics.train_flops_per_token(self.config, t.method, stats.seq_len, t.lora_rank,
                                                                 self.stage.full_layers)
            interval.add(loss * stats.label_tokens, stats.label_tokens, stats.tokens, flops, grad_norm)
            done = state.step == state.total_steps
            report, to_ray = None, False
            if state.step % t.log_every == 0 or done:
                report, to_ray = self.interval_metrics(interval)
                interval = _Interval()
            if state.step % t.checkpoint_every == 0 or done:
                interval.exclude(self.save(report or {"step": state.step}))
            elif to_ray:
                ray.train.report(report)
                self.last_report = time.monotonic()
        if self.last_checkpoint != state.step:  # the data ended between checkpoints
            report = self.interval_metrics(interval)[0] if interval.steps else {"step": state.step}
            self.save({**report, "stopped": "data_exhausted"})

    def optimizer_step(self, micro: list[Batch]) -> tuple[float, float, BatchStats]:
        """One optimizer step over `micro`; returns (loss, grad norm, the step's token counts)."""
        step = self.state.step + 1
        stats = check_batches(micro, self.config, step, self.device)
        for b in micro:
            self.state.count(b)
        self.lr = self.state.scheduler.get_last_lr()[0]
        r = train_step(self.model, self.optimizer, micro, stats, self.train_cfg.grad_clip, self.device, self.world,
                       self.stage.loss)
        if not r.finite:
            kept = (f"the last good checkpoint is step {self.last_checkpoint}" if self.last_checkpoint
                    else "no checkpoint was saved before it")
            raise DivergedError(
                f"training diverged at step {step}: loss {r.loss}, grad norm {r.grad_norm}; {kept} "
                f"(nothing of the bad state is saved). Lower train.lr or raise warmup_steps, then run again.",
                step=step,
            )
        self.state.scheduler.step()
        return r.loss, r.grad_norm, stats

    # ------------------------------------------------------------------ metrics and checkpoints

    def interval_metrics(self, interval: "_Interval") -> tuple[dict, bool]:
        """Metrics of the steps since the last report, and whether to hand them to Ray Train now;
        collective (every rank calls it)."""
        elapsed = max(interval.elapsed(), 1e-9)
        # Ray Train's controller takes one report per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s
        # by default) and a report made before the last was taken blocks training, so metrics go to
        # Ray no more often than that; the progress line and metrics.jsonl get every interval.
        # Rank 0's clock decides for all ranks: they must report equally often.
        due = time.monotonic() - self.last_report >= self.report_every_s if self.rank == 0 else False
        shared = torch.tensor([metrics.peak_memory_gb(self.device), float(due)], device=self.device)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        peak_mem, due = shared[0], bool(shared[1])
        self.state.gather()
        tflops = interval.flops / elapsed / self.world / 1e12
        m = {
            "step": self.state.step,
            "loss": interval.loss_sum / max(interval.label_tokens, 1),
            "lr": self.lr,
            "grad_norm": interval.grad_norm,
            "tokens_per_s": interval.tokens / elapsed,
            "interval_s": elapsed,
            "data_wait_s": interval.data_wait,  # of interval_s, spent waiting for the reader (rank 0)
            # CPU seconds of rank 0's process: near interval_s x threads when compute-bound on CPU;
            # far below it on a CPU machine means the worker was starved (shared or oversubscribed).
            "worker_cpu_s": interval.cpu(),
            "tflops_per_worker": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "peak_memory_gb": float(peak_mem),
            "tokens_total": self.state.tokens_total,
            "resumed_from_step": self.resumed_from,
            "total_steps": self.state.total_steps,
            **{f"tokens_{k}": v for k, v in sorted(self.state.tokens_per_language.items())},
        }
        if self.rank == 0:
            self.log.append(m)
            self.metric_logger.log_dict(m, self.state.step)
            log.info(self.progress.line(m))
            log.debug(metrics.progress_detail(m))
        return m, due

    def save(self, report: dict) -> tuple[float, float]:
        """Save a checkpoint of this step with `report` (and every resume of the run) attached;
        returns the (wall, CPU) seconds it took. Collective."""
        began, began_cpu = time.perf_counter(), time.process_time()
        self.state.gather()
        if self.rank == 0:
            self.log.write(self.loop.extra_metrics_uri)
        checkpoint.save(self.model, self.optimizer, self.state, {**report, "resumed": self.state.resumed})
        self.last_report = time.monotonic()
        self.last_checkpoint = self.state.step
        return time.perf_counter() - began, time.process_time() - began_cpu

    # ------------------------------------------------------------------ export

    def export(self) -> None:
        """Write the trained model to `output_uri` as a HF checkpoint, tensor by tensor."""
        export.export(self.model, self.model_dir, self.loop.output_uri)
        if self.rank == 0:
            self.log.write(self.loop.extra_metrics_uri)
            self.metric_logger.close()
            log.info(f"exported {self.loop.output_uri}")


class _Interval:
    """Sums over the steps between two metric reports; checkpoint time is excluded."""

    def __init__(self):
        self.loss_sum = self.label_tokens = self.tokens = self.flops = self.data_wait = 0.0
        self.excluded = self.excluded_cpu = 0.0
        self.steps = 0
        self.grad_norm = float("nan")
        self.start, self.start_cpu = time.perf_counter(), time.process_time()

    def exclude(self, seconds: tuple[float, float]) -> None:
        self.excluded += seconds[0]
        self.excluded_cpu += seconds[1]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def cpu(self) -> float:
        """CPU seconds of this process (all its threads) in the interval."""
        return time.process_time() - self.start_cpu - self.excluded_cpu

    def add(self, loss_sum: float, label_tokens: int, tokens: int, flops: float, grad_norm: float) -> None:
        self.loss_sum += loss_sum
        self.label_tokens += label_tokens
        self.tokens += tokens
        self.flops += flops
        self.grad_norm = grad_norm
        self.steps += 1
