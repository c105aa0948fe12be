"""A fixed-rows data plan for tests and benchmarks: the `BatchReader` protocol without tokenizing.

Rows of token ids live in a Ray Dataset handed to TorchTrainer unsplit; every worker streams all
rows in order and keeps its own share (micro-batch j of worker r is rows
[(j * world + r) * B, ... + B)), so the sequence of each worker is deterministic and `skip` is
exact; so is `start` (the stream begins after that many rows, on any number of workers). The
real corpus reader is `elo_ray.data`; this one only feeds known tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

DATASET = "train"


def learnable_rows(
    num_rows: int, seq_len: int, vocab_size: int, seed: int = 0, lang: str = "en", distinct: int = 2
) -> list[dict]:
    """Rows a model learns in a few steps: each counts up (modulo the vocabulary) from one of
    `distinct` random starts."""
    rng = np.random.default_rng(seed)
    starts = rng.choice(rng.integers(0, vocab_size, size=distinct), size=num_rows)
    rows = []
    for s in starts:
        ids = ((int(s) + np.arange(seq_len)) % vocab_size).tolist()
        rows.append({"input_ids": ids, "labels": ids, "lang": lang})
    return rows


def random_rows(num_rows: int, seq_len: int, vocab_size: int, seed: int = 0, lang: str = "en") -> list[dict]:
    """Uniformly random token rows (for throughput: what is learned does not matter)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(num_rows, seq_len))
    return [{"input_ids": r.tolist(), "labels": r.tolist(), "lang": lang} for r in ids]


@dataclass
class RowsReader:
    """`BatchReader` over the unsplit Ray Dataset `dataset` of rows {input_ids, labels, lang}."""

    num_rows: int
    seq_len: int
    dataset: str = DATASET

    def totals(self) -> dict:
        return {"sequences": self.num_rows, "tokens": self.num_rows * self.seq_len}

    def resume_bound(self, old_world: int) -> int:
        return 0  # every worker reads all rows in order: a resumed stream starts at the exact row

    def batches(self, micro_batch_size: int, skip: int = 0, start: dict[str, int] | None = None) -> Iterator[dict]:
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        rows = itertools.islice(self._rows(ray.train.get_dataset_shard(self.dataset)), sum((start or {}).values()), None)
        per_step = micro_batch_size * world
        for j, chunk in enumerate(iter(lambda: list(itertools.islice(rows, per_step)), [])):
            if len(chunk) < per_step:  # the last partial chunk is not yielded
                return
            if j < skip:
                continue
            mine = chunk[rank * micro_batch_size:(rank + 1) * micro_batch_size]
            input_ids = torch.from_numpy(np.stack([ids for ids, _, _ in mine])).long()
            labels = torch.from_numpy(np.stack([labels for _, labels, _ in mine])).long()
            tokens: dict[str, int] = {}
            sequences: dict[str, int] = {}
            for ids, _, lang in mine:
                tokens[lang] = tokens.get(lang, 0) + len(ids)
                sequences[lang] = sequences.get(lang, 0) + 1
            yield {"input_ids": input_ids, "labels": labels, "tokens": tokens, "sequences": sequences}

    @staticmethod
    def _rows(shard) -> Iterator[tuple]:
        for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
            for ids, labels, lang in zip(batch["input_ids"], batch["labels"], batch["lang"]):
                yield ids, labels, str(lang)


@dataclass
class RowsPlan:
    """What `run_training` takes from a data plan: datasets, their config, and the reader."""

    datasets: dict
    dataset_config: object
    reader: RowsReader


def rows_plan(rows: list[dict], dataset: str = DATASET) -> RowsPlan:
    """A plan over fixed rows; every worker reads all of them in order and keeps its share."""
    import ray.data
    import ray.train

    ds = ray.data.from_items(rows)
    options = ray.data.ExecutionOptions(preserve_order=True)
    config = ray.train.DataConfig(datasets_to_split=[], execution_options=options)
    seq_len = len(rows[0]["input_ids"]) if rows else 0
    return RowsPlan({dataset: ds}, config, RowsReader(len(rows), seq_len, dataset))
