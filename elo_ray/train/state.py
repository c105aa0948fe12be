"""The worker's train state: where a stage stands, as one object that DCP checkpoints.

As torchtitan's trainer does, the state is `Stateful` (`state_dict`/`load_state_dict`) and is
saved and restored by DCP next to the model and the optimizer (under the key "train_state" of
the same checkpoint; `checkpoint.py`), so nothing is packed or unpacked by hand. It holds the step,
the schedule (length, global batch, LR scheduler), the data position, the tokens and sequences
trained per language, every resume of the run, and the fingerprint of the model it belongs to.

Counts per language are kept for all workers together: each rank adds its own batches and
`gather` (collective) folds them in before metrics and checkpoints. Global counts, not per-rank
ones, are what let a run resume on another number of workers (`reshard`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from elo_ray.config import TrainConfig
from elo_ray.train.errors import TrainingError
from elo_ray.train.optim import build_scheduler
from elo_ray.train.reader import Batch


@dataclass
class DataPosition:
    """Where the workers stand in the data stream they read."""

    world: int  # workers the stream is split over
    micro_batch_size: int  # sequences per micro-batch of each worker
    grad_accum: int  # micro-batches per optimizer step of each worker
    micro_batches: int = 0  # micro-batches of this stream each worker has consumed
    # Per language, sequences all workers had trained before this stream began: empty unless the
    # run was resumed on another number of workers (the reader starts each language after them).
    start: dict[str, int] = field(default_factory=dict)


class TrainState(Stateful):
    """Step, schedule, data position and token counts of a stage; `Stateful` for DCP."""

    def __init__(self, *, data: DataPosition, total_steps: int, optimizer, train: TrainConfig, fingerprint: dict):
        self.step = 0
        self.total_steps = total_steps  # of the schedule; fixed when the run starts
        self.global_batch = data.world * data.micro_batch_size * data.grad_accum  # sequences per step
        self.tokens_total = 0
        self.tokens_per_language: Counter = Counter()  # trained, all workers
        self.sequences_per_language: Counter = Counter()  # trained, all workers
        self.data = data
        self.resumed: list[dict] = []  # one record per resume of the run
        # The LR at a step depends on the schedule's length, which a resumed run takes from here.
        self.scheduler = build_scheduler(optimizer, train, lambda: self.total_steps)
        self.fingerprint = fingerprint
        self._tokens: Counter = Counter()  # this rank's, not yet gathered
        self._sequences: Counter = Counter()

    # ------------------------------------------------------------------ Stateful

    def state_dict(self) -> dict:
        # DCP flattens nested dicts into keys and loads only the keys a fresh state already has;
        # languages and resume records are not known before loading, so they travel as JSON.
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "global_batch": self.global_batch,
            "tokens_total": self.tokens_total,
            "tokens_per_language": json.dumps(dict(self.tokens_per_language)),
            "sequences_per_language": json.dumps(dict(self.sequences_per_language)),
            "data": json.dumps(asdict(self.data)),
            "resumed": json.dumps(self.resumed),
            "scheduler": json.dumps(self.scheduler.state_dict()),
            "fingerprint": json.dumps(self.fingerprint),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.total_steps = int(state["total_steps"])
        self.global_batch = int(state["global_batch"])
        self.tokens_total = int(state["tokens_total"])
        self.tokens_per_language = Counter(json.loads(state["tokens_per_language"]))
        self.sequences_per_language = Counter(json.loads(state["sequences_per_language"]))
        self.data = DataPosition(**json.loads(state["data"]))
        self.resumed = json.loads(state["resumed"])
        self.scheduler.load_state_dict(json.loads(state["scheduler"]))
        self.fingerprint = json.loads(state["fingerprint"])

    # ------------------------------------------------------------------ progress

    def count(self, batch: Batch) -> None:
        """Add one of this rank's micro-batches (its tokens and sequences per language)."""
        self._tokens.update(batch["tokens"])
        self._sequences.update(batch["sequences"])

    def advance(self, tokens: int) -> None:
        """One optimizer step done; `tokens`: its input tokens on all ranks."""
        self.step += 1
        self.data.micro_batches += self.data.grad_accum
        self.tokens_total += tokens

    def gather(self) -> None:
        """Fold every rank's counts since the last gather into the global ones. Collective."""
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (dict(self._tokens), dict(self._sequences)))
        for tokens, sequences in parts:
            self.tokens_per_language.update(tokens)
            self.sequences_per_language.update(sequences)
        self._tokens.clear()
        self._sequences.clear()

    # ------------------------------------------------------------------ resume

    def resplit(self, micro_batch_size: int, grad_accum: int) -> dict:
        """Continue on the same workers with each step's sequences split into `grad_accum`
        micro-batches of `micro_batch_size` (e.g. smaller ones to fit memory); returns the record.

        Every worker reads the same stream as before, so the run continues exactly where it
        stopped. Raises `TrainingError` when the split holds another number of sequences per step."""
        old = self.data
        if micro_batch_size * grad_accum != old.micro_batch_size * old.grad_accum:
            raise TrainingError(
                f"cannot resume step {self.step} with micro_batch_size {micro_batch_size} x grad_accum {grad_accum}: "
                f"the run trains {old.micro_batch_size * old.grad_accum} sequences per worker per step "
                f"(micro_batch_size {old.micro_batch_size} x grad_accum {old.grad_accum}); keep that product, "
                f"or start a new run name"
            )
        sequences = old.micro_batches * old.micro_batch_size  # read by each worker so far
        self.data = DataPosition(world=old.world, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                                 micro_batches=sequences // micro_batch_size, start=old.start)
        return {"from_step": self.step, "old_world": old.world, "new_world": old.world,
                "micro_batch_size": micro_batch_size, "grad_accum": grad_accum,
                "was": {"micro_batch_size": old.micro_batch_size, "grad_accum": old.grad_accum}}

    def reshard(self, world: int, max_micro_batch_size: int) -> dict:
        """Continue on `world` workers where the state's workers stopped; returns the record.

        The global batch stays what it was (the schedule, its length and the LR at each step do
        not change): each worker takes `global_batch / world` sequences per step, in micro-batches
        as large as `max_micro_batch_size` allows. The new stream starts each language after the
        sequences all workers have trained so far. Raises `TrainingError` when `world` does not
        divide the global batch."""
        old = self.data
        if self.global_batch % world:
            fits = [n for n in range(1, self.global_batch + 1) if self.global_batch % n == 0]
            raise TrainingError(
                f"cannot resume step {self.step} on {world} workers: the run's global batch of "
                f"{self.global_batch} sequences ({old.world} workers x micro_batch_size {old.micro_batch_size} "
                f"x grad_accum {old.grad_accum}) does not split evenly over {world}; set resources.num_workers "
                f"to one of {', '.join(map(str, fits))}"
            )
        per_worker = self.global_batch // world
        micro = max(n for n in range(1, min(per_worker, max_micro_batch_size) + 1) if per_worker % n == 0)
        self.data = DataPosition(world=world, micro_batch_size=micro, grad_accum=per_worker // micro,
                                 start=dict(self.sequences_per_language))
        return {
            "from_step": self.step, "old_world": old.world, "new_world": world,
            "micro_batch_size": micro, "grad_accum": per_worker // micro,
            "sequences_trained": dict(self.sequences_per_language),
        }
