"""Inside each Ray Train worker: mix the per-language shards into micro-batches by ratio.

Every packed sequence holds one language, so mixing is a choice of *which language's next
sequence* fills each slot. `mix_order` makes that choice with a deficit rule (always the
language furthest below its quota's share of the sequences so far): the languages interleave
finely and every prefix of the stream is within one sequence per language of the asked
ratio. The order depends only on the quotas, which are the same on every worker, so all
workers switch languages in step and end on the same micro-batch.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np

from elo_ray.data.documents import StreamKind

log = logging.getLogger(__name__)
SHUFFLE_WINDOW = 256  # sequences per language held back and drawn at random (seeded)
_LOG_EVERY_S = 60.0


def mix_order(quotas: dict[str, int]) -> Iterator[str]:
    """Languages in stream order: each exactly `quotas[lang]` times, finely interleaved."""
    langs = sorted(lang for lang, q in quotas.items() if q > 0)
    total = sum(quotas[lang] for lang in langs)
    taken = dict.fromkeys(langs, 0)
    for n in range(1, total + 1):
        # deficit of lang after n slots, scaled by total to stay in integers: q*n - taken*total
        best = max((lang for lang in langs if taken[lang] < quotas[lang]),
                   key=lambda lang: quotas[lang] * n - taken[lang] * total)
        taken[best] += 1
        yield best


class Row(NamedTuple):
    """One sequence of a language's shard."""

    input_ids: np.ndarray  # [seq_len]
    labels: np.ndarray | None  # [seq_len], -100 where no loss (chat); None: the input_ids (pretrain)
    tokens: int  # tokens trained: seq_len (pretrain), the example's length (chat)
    dropped: int  # tokens of the unit's tail, accounted on its last row (pretrain)


class _Rows:
    """One language's shard as a stream of rows, through a seeded shuffle window; the first
    `drop` rows of the shard are left out (a run resumed on another number of workers)."""

    def __init__(self, shard, lang_index: int, seed: int, repeat: bool, window: int, drop: int = 0):
        self.shard, self.repeat, self.window = shard, repeat, window
        self.rng = np.random.default_rng([seed, lang_index])
        self.buf: list[Row] = []
        self.source = self._rows()
        for _ in itertools.islice(self.source, drop):  # read and discarded, as `skip` does
            pass
        self.exhausted = False

    def _rows(self) -> Iterator[Row]:
        while True:
            n = 0
            for batch in self.shard.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=1):
                # Copies: a zero-copy row waiting in the shuffle window would pin its whole block
                # in the object store.
                ids = np.array(batch["input_ids"])
                labels = None if batch.get("labels") is None else np.array(batch["labels"])
                tokens = batch.get("tokens")
                dropped = batch.get("dropped")
                for i in range(len(ids)):
                    yield Row(ids[i], None if labels is None else labels[i],
                              ids.shape[1] if tokens is None else int(tokens[i]),
                              0 if dropped is None else int(dropped[i]))
                n += len(ids)
            if not self.repeat or n == 0:
                return

    def next(self) -> Row | None:
        while not self.exhausted and len(self.buf) < self.window:
            row = next(self.source, None)
            if row is None:
                self.exhausted = True
            else:
                self.buf.append(row)
        if not self.buf:
            return None
        i = int(self.rng.integers(len(self.buf)))
        self.buf[i], self.buf[-1] = self.buf[-1], self.buf[i]
        return self.buf.pop()


@dataclass
class StreamReader:
    """A worker's handle on the stream: small and picklable (goes in `train_loop_config`).

    Inside a Ray Train worker, `batches` reads this worker's shard of every language's dataset
    (`ray.train.get_dataset_shard`) and mixes them by `quotas`. Outside Ray Train (tests,
    benchmarks), `StreamPlan.local_readers()` binds readers to the same shards.
    """

    kind: StreamKind
    datasets: dict[str, str]  # language -> dataset name in StreamPlan.datasets
    quotas: dict[str, int]  # sequences of each language per worker
    shares: dict[str, float]  # asked share of each language
    seq_len: int
    world_size: int
    seed: int = 0
    repeat: tuple[str, ...] = ()  # languages that may start over when their shard ends
    window: int = SHUFFLE_WINDOW
    block_rows: int = 256  # rows per Ray Data block at most; bounds a resume on another world size
    _shards: dict | None = field(default=None, repr=False, compare=False)
    _seen: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_shards"] = None  # iterators of a local run stay local
        return state

    @property
    def sequences_per_worker(self) -> int:
        return sum(self.quotas.values())

    def micro_batches(self, micro_batch_size: int) -> int:
        """Micro-batches every worker yields (the last partial one is not yielded)."""
        return self.sequences_per_worker // micro_batch_size

    def batches(self, micro_batch_size: int, skip: int = 0, start: dict[str, int] | None = None) -> Iterator[dict]:
        """This worker's micro-batches in their deterministic order, without the first `skip`.

        Yields {"input_ids": LongTensor[B, seq_len], "labels": LongTensor[B, seq_len] (-100: no
        loss; pretraining: equal to input_ids), "tokens": {language: trained tokens},
        "sequences": {language: sequences}}. Every worker yields `micro_batches(B)` of them. A
        resumed run reads and discards the skipped part (tokenization is cheap next to training;
        see benchmarks/ingest.py).

        `start` (a run resumed on another number of workers): per language, the sequences all
        workers of the earlier stream trained. Each worker leaves out the first
        `start[lang] // world_size` rows of its shard of every language and mixes the rest by
        the quotas less those rows, so the languages keep the asked ratio and the stream ends
        where the earlier one would have. Which rows the earlier workers read is known only up
        to Ray Data's blocks and their shuffle windows: see `resume_bound`.
        """
        import torch

        shards = self._shards if self._shards is not None else self._train_shards()
        langs = sorted(self.datasets)
        drop = {lang: (start or {}).get(lang, 0) // self.world_size for lang in langs}
        quotas = {lang: max(0, self.quotas[lang] - drop[lang]) for lang in langs}
        rows = {lang: _Rows(shards[lang], i, self.seed, lang in self.repeat, self.window, drop[lang])
                for i, lang in enumerate(langs)}
        self._seen = {lang: Counter() for lang in langs}
        self._seen_batches, self._start = 0, time.monotonic()
        if start and self._rank() == 0:
            log.info(f"data: resumed on {self.world_size} worker(s) after "
                     + ", ".join(f"{start.get(lang, 0)} {lang}" for lang in langs)
                     + " sequences trained; each worker starts its shards after "
                     + ", ".join(f"{drop[lang]} {lang}" for lang in langs))
        order = mix_order(quotas)
        try:
            yield from self._mix(rows, order, sum(quotas.values()) // micro_batch_size, micro_batch_size, skip, torch)
        finally:  # close the shard iterators while Ray is still up (not at interpreter exit)
            for r in rows.values():
                r.source.close()

    def resume_bound(self, old_world: int) -> int:
        """Sequences of each language that a stream begun at `start` may train a second time,
        and that it may never read, next to what `old_world` workers read before it.

        Ray Data hands each block to the split that has been dispatched the fewest rows, so the
        first m rows of every worker's shard are, together, the first world x m rows of the
        language's dataset, give or take about world x block_rows (more near the end of the
        dataset, where the last blocks are cut to equal sizes: up to three times that). Each old
        worker also held up to `window` rows it had read but not trained in its shuffle window.
        Both splits' block margins, the old workers' windows, and one row per new worker of
        rounding make the bound."""
        return old_world * self.window + 3 * (old_world + self.world_size) * self.block_rows + self.world_size

    def _mix(self, rows: dict, order: Iterator[str], micro_batches: int, micro_batch_size: int, skip: int,
             torch) -> Iterator[dict]:
        last_log = self._start
        for b in range(micro_batches):
            picked = []
            for lang in (next(order) for _ in range(micro_batch_size)):
                row = rows[lang].next()
                if row is None:  # the corpus changed since planning; all workers end here
                    log.warning(f"data: {lang} ran out after {b} micro-batches (the corpus changed since "
                                f"the plan counted it); ending the stream")
                    return
                seen = self._seen[lang]
                seen["sequences"] += 1
                seen["trained"] += row.tokens
                seen["dropped"] += row.dropped
                seen["read"] += row.tokens + row.dropped
                picked.append((lang, row))
            self._seen_batches = b + 1
            if b < skip:
                continue
            input_ids = torch.from_numpy(np.stack([r.input_ids for _, r in picked])).long()
            if self.kind is StreamKind.CHAT:
                labels = torch.from_numpy(np.stack([r.labels for _, r in picked])).long()
            else:
                labels = input_ids.clone()
            tokens, sequences = Counter(), Counter()
            for lang, r in picked:
                tokens[lang] += r.tokens
                sequences[lang] += 1
            yield {"input_ids": input_ids, "labels": labels, "tokens": dict(tokens), "sequences": dict(sequences)}
            now = time.monotonic()
            if now - last_log > _LOG_EVERY_S and self._rank() == 0:
                last_log = now
                log.info(f"data: {self._progress_line()}")

    def totals(self) -> dict:
        """The plan's size of the whole stream (all workers) and this worker's accounting so far.

        "sequences"/"tokens": planned for the whole stream (the schedule length comes from it);
        "languages": per language, what this worker has read, trained and dropped (batch tails)
        so far; "shares": the achieved share of trained tokens per language, next to "asked".
        """
        trained = {lang: s["trained"] for lang, s in self._seen.items()}
        total = sum(trained.values())
        elapsed = time.monotonic() - self._start if self._seen else 0.0
        out = {
            "sequences": self.sequences_per_worker * self.world_size,
            "sequences_per_worker": self.sequences_per_worker,
            "asked": dict(self.shares),
            "languages": {lang: {k: int(s[k]) for k in ("read", "trained", "dropped", "sequences")}
                          for lang, s in self._seen.items()},
            "shares": {lang: (n / total if total else 0.0) for lang, n in trained.items()},
            "micro_batches": getattr(self, "_seen_batches", 0),
            "tokens_per_s": total / elapsed if elapsed > 0 else 0.0,
        }
        if self.kind is StreamKind.PRETRAIN:
            out["tokens"] = out["sequences"] * self.seq_len
        return out

    def _progress_line(self) -> str:
        t = self.totals()
        shares = ", ".join(f"{lang} {100 * s:.1f}%" for lang, s in t["shares"].items())
        trained = sum(v["trained"] for v in t["languages"].values())
        return f"{trained / 1e6:.2f}M tokens on this worker ({shares}), {t['tokens_per_s'] / 1e3:.1f}k tokens/s"

    def _train_shards(self) -> dict:
        import ray.train

        return {lang: ray.train.get_dataset_shard(name) for lang, name in self.datasets.items()}

    def _rank(self) -> int:
        if self._shards is not None:
            return 0
        import ray.train

        return ray.train.get_context().get_world_rank()
