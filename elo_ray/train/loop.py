"""The worker loop: the one training loop of every stage, run by Ray Train in each worker.

A stage differs only in what `LoopConfig` names: the model (a detached ELO model, or the full
merged model), the trainable parameters (`train.method`), the data (`reader`) and the
hyper-parameters (`train`). Per optimizer step the loop:

1. takes `grad_accum` micro-batches from the reader and checks they fit the model (collective:
   every rank learns of a bad batch on any rank, so they stop together);
2. runs forward/backward with the causal-LM loss summed over the label tokens (labels -100
   carry no loss) and divided by the step's label tokens on all ranks, so that accumulation and
   data parallelism give the same gradient as one big batch;
3. clips the gradient norm, stops on a NaN/inf loss or norm *before* the update (so no checkpoint
   of a bad state exists), steps AdamW and the schedule;
4. every `log_every` steps reports metrics to Ray Train and prints a progress line; every
   `checkpoint_every` steps (and at the end) saves a sharded checkpoint.

At the end it exports the trained model as a HF checkpoint at `output_uri`. Errors that a retry
cannot fix (`TrainingError`) end every worker cleanly and are recorded in `error.json` in the
run's storage, from which `run_training` raises them on the driver.
"""

from __future__ import annotations

import collections
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
from elo_ray.train import checkpoint, export, metrics
from elo_ray.train import model as model_lib
from elo_ray.train.errors import DivergedError, TrainingError
from elo_ray.train.optim import build_optimizer, build_scheduler
from elo_ray.train.reader import Batch, BatchReader
from elo_ray.train.step import check_batches, train_step

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
    total_steps: int  # optimizer steps of the schedule (the run may stop earlier when data ends)
    extra_metrics_uri: str | None = None  # a second copy of metrics.jsonl (e.g. the stage's directory)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `TorchTrainer(train_loop_per_worker, train_loop_config={"loop": ...})`."""
    loop: LoopConfig = config["loop"]
    worker = Worker(loop)
    try:
        worker.run()
    except TrainingError as e:
        # Raised on every rank at the same point (checks are collective): end cleanly so that
        # Ray Train does not retry what cannot succeed, and leave the reason for the driver.
        if worker.rank == 0:
            if worker.log is not None:  # keep the curve up to the failure
                worker.log.write()
            record = {"type": type(e).__name__, "message": str(e), "step": getattr(e, "step", None)}
            storage.write_text(storage.join(loop.run_uri, ERROR_FILE), json.dumps(record))


class Worker:
    """One rank's view of the stage: model shard, optimizer, data position, metrics."""

    def __init__(self, loop: LoopConfig):
        self.loop = loop
        self.train = loop.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.device = ray.train.torch.get_device()
        self.log: metrics.MetricsLog | None = None  # rank 0's records, once the run's are read back
        self.report_every_s = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))
        self.progress = metrics.Progress(loop.total_steps)  # rank 0's progress lines, with ETA
        self.last_report = time.monotonic()

    # ------------------------------------------------------------------ set-up

    def run(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        t = self.train
        torch.manual_seed(t.seed)
        mesh = init_device_mesh(self.device.type, (self.world,))
        self.model_dir = model_lib.fetch(self.loop.model_uri, self.local_rank)
        self.stage = model_lib.build(self.model_dir, t, self.device, mesh)
        self.model = self.stage.module
        self.config = self.stage.config
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.scheduler = build_scheduler(self.optimizer, t, self.loop.total_steps)
        self.fingerprint = checkpoint.fingerprint(self.model, self.config, t.method, self.world)
        mp = model_lib.mixed_precision(t.precision, self.device)
        self.compute_dtype = mp.param_dtype if mp is not None else torch.float32
        self.peak = metrics.peak_tflops(self.device, self.compute_dtype)

        saved = checkpoint.restore(self.model, self.optimizer, self.fingerprint)
        self.step = saved["step"] if saved else 0
        self.consumed = saved["consumed"] if saved else 0
        self.lang_tokens = collections.Counter(saved["lang_tokens"][self.rank] if saved else {})
        self.tokens_total = saved["tokens_total"] if saved else 0
        if saved:
            self.scheduler.load_state_dict(saved["scheduler"])
        self.resumed_from = self.step
        self.last_checkpoint = self.step if saved else None
        if self.rank == 0:
            self.log = metrics.MetricsLog.resume(storage.join(self.loop.run_uri, METRICS_FILE), self.step)
        if self.rank == 0:
            what = f"resuming from step {self.step}" if saved else "starting"
            log.info(f"{t.method}: {what}; {len(self.stage.trainable)} trainable tensors, "
                     f"{self.loop.total_steps} steps, {self.world} worker(s) on {self.device.type}"
                     + (f" ({torch.get_num_threads()} threads each)" if self.device.type == "cpu" else ""))
        self.train_steps()
        export.export(self.model, self.model_dir, self.loop.output_uri)
        if self.rank == 0:
            self.log.write(self.loop.extra_metrics_uri)
            log.info(f"exported {self.loop.output_uri}")

    # ------------------------------------------------------------------ training

    def train_steps(self) -> None:
        t = self.train
        batches = iter(self.loop.reader.batches(t.micro_batch_size, skip=self.consumed))
        interval = _Interval()
        while self.step < self.loop.total_steps:
            waited = time.perf_counter()
            micro = [b for _, b in zip(range(t.grad_accum), batches)]
            interval.data_wait += time.perf_counter() - waited
            if len(micro) < t.grad_accum:  # every worker yields the same count: all stop here
                if self.step == 0:
                    raise TrainingError(
                        f"the data stream ended before the first step: fewer than grad_accum={t.grad_accum} "
                        f"micro-batches of {t.micro_batch_size} sequences per worker; add data or lower them"
                    )
                break
            loss, grad_norm, tokens, label_tokens, seq_len = self.optimizer_step(micro)
            self.step += 1
            self.consumed += t.grad_accum
            self.tokens_total += tokens
            flops = tokens * metrics.train_flops_per_token(self.config, t.method, seq_len, t.lora_rank,
                                                            self.stage.full_layers)
            interval.add(loss * label_tokens, label_tokens, tokens, flops, grad_norm)
            done = self.step == self.loop.total_steps
            report, to_ray = None, False
            if self.step % t.log_every == 0 or done:
                report, to_ray = self.interval_metrics(interval)
                interval = _Interval()
            if self.step % t.checkpoint_every == 0 or done:
                interval.exclude(self.save(report or {"step": self.step}))
            elif to_ray:
                ray.train.report(report)
                self.last_report = time.monotonic()
        if self.last_checkpoint != self.step:  # the data ended between checkpoints
            report = self.interval_metrics(interval)[0] if interval.steps else {"step": self.step}
            self.save({**report, "stopped": "data_exhausted"})

    def optimizer_step(self, micro: list[Batch]) -> tuple[float, float, int, int, int]:
        """One optimizer step over `micro`; returns (loss, grad norm, tokens, label tokens, seq len)."""
        stats = check_batches(micro, self.config, self.step + 1, self.device)
        for b in micro:
            for lang, n in b.get("tokens", {}).items():
                self.lang_tokens[lang] += int(n)
        self.lr = self.scheduler.get_last_lr()[0]
        r = train_step(self.model, self.optimizer, micro, stats, self.train.grad_clip, self.device, self.world,
                       self.stage.loss)
        if not r.finite:
            kept = (f"the last good checkpoint is step {self.last_checkpoint}" if self.last_checkpoint
                    else "no checkpoint was saved before it")
            raise DivergedError(
                f"training diverged at step {self.step + 1}: loss {r.loss}, grad norm {r.grad_norm}; {kept} "
                f"(nothing of the bad state is saved). Lower train.lr or raise warmup_steps, then run again.",
                step=self.step + 1,
            )
        self.scheduler.step()
        return r.loss, r.grad_norm, stats.tokens, stats.label_tokens, stats.seq_len

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
        langs = [None] * self.world
        dist.all_gather_object(langs, dict(self.lang_tokens))
        tflops = interval.flops / elapsed / self.world / 1e12
        m = {
            "step": self.step,
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
            "tokens_total": self.tokens_total,
            "resumed_from_step": self.resumed_from,
            "total_steps": self.loop.total_steps,
            **{f"tokens_{k}": v for k, v in sorted(sum(map(collections.Counter, langs), collections.Counter()).items())},
        }
        if self.rank == 0:
            self.log.append(m)
            log.info(self.progress.line(m))
            log.debug(metrics.progress_detail(m))
        return m, due

    def save(self, report: dict) -> tuple[float, float]:
        """Save a checkpoint of this step with `report` attached; returns the (wall, CPU)
        seconds it took."""
        began, began_cpu = time.perf_counter(), time.process_time()
        langs = [None] * self.world
        dist.all_gather_object(langs, dict(self.lang_tokens))
        state = {
            "step": self.step,
            "consumed": self.consumed,
            "tokens_total": self.tokens_total,
            "lang_tokens": langs,
            "scheduler": self.scheduler.state_dict(),
            "fingerprint": self.fingerprint,
        }
        if self.rank == 0:
            self.log.write(self.loop.extra_metrics_uri)
        checkpoint.save(self.model, self.optimizer, state, report)
        self.last_report = time.monotonic()
        self.last_checkpoint = self.step
        return time.perf_counter() - began, time.process_time() - began_cpu


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
