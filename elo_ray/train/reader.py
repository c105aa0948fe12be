"""What the worker loop needs from the data plane: the `BatchReader` protocol.

The engine depends only on this protocol, never on how batches are made. `elo_ray.data`
provides the real reader (read -> tokenize -> pack -> mix); `elo_ray.train.synthetic` a
fixed-rows one for tests and benchmarks.
"""

from __future__ import annotations

from typing import Iterator, Protocol, TypedDict, runtime_checkable

import torch


class Batch(TypedDict):
    """One micro-batch of one worker."""

    input_ids: torch.Tensor  # LongTensor[B, S]
    labels: torch.Tensor  # LongTensor[B, S]; -100 = no loss; aligned with input_ids (the loss shifts)
    tokens: dict[str, int]  # tokens of this micro-batch per language
    sequences: dict[str, int]  # sequences (rows) of this micro-batch per language


@runtime_checkable
class BatchReader(Protocol):
    """A picklable handle that each Ray Train worker turns into its stream of micro-batches."""

    def batches(self, micro_batch_size: int, skip: int = 0, start: dict[str, int] | None = None) -> Iterator[Batch]:
        """This worker's deterministic sequence of micro-batches, without its first `skip`.

        Called inside a Ray Train worker. Every worker yields the same number of batches, so
        that collectives stay in step; `skip` is how a resumed run continues where it stopped.
        `start`: per language, sequences that all workers together trained in an earlier stream
        of the run, on another number of workers: the stream continues each language after them
        (within `resume_bound` sequences) and ends where the earlier one would have.
        """
        ...

    def resume_bound(self, old_world: int) -> int:
        """At most how many sequences of each language a stream begun at `start` trains a second
        time, and at most how many it never reads, next to what `old_world` workers read before.
        0: the resumed stream is exact."""
        ...

    def totals(self) -> dict:
        """Token accounting of the whole stream (e.g. {"tokens": N, "sequences": M, ...})."""
        ...
